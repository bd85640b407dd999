# One feature browser per cell (config key features): the cells of features.cells are built
# by the sweep, any other cell's on demand (ask for its features/index.html).


rule feature_settings:
    output:
        f"{RUN}/cells/{{site}}/{{cell}}/features_settings.json",
    log:
        f"{RUN}/logs/feature_settings/{{site}}/{{cell}}.log",
    localrule: True
    conda:
        "../../envs/saesweep.yaml"
    params:
        settings=lambda wildcards: json.dumps(
            to_json(job.feature_settings(config, wildcards.site, wildcards.cell)),
            sort_keys=True,
        ),
    shell:
        "saesweep settings --json {params.settings:q} --out {output:q} > {log} 2>&1"


rule feature_browser:
    input:
        MODEL_INPUT,
        settings=rules.feature_settings.output[0],
        weights=rules.train_cell.output.weights,
        cfg=rules.train_cell.output.cfg,
        activations=f"{RUN}/activations/{{site}}-eval/manifest.json",
    output:
        report(
            f"{RUN}/cells/{{site}}/{{cell}}/features/index.html",
            caption="../report/feature_browser.rst",
            category="Feature browsers",
            subcategory="{site}",
            labels={"cell": "{cell}"},
        ),
    log:
        f"{RUN}/logs/feature_browser/{{site}}/{{cell}}.log",
    benchmark:
        f"{RUN}/benchmarks/feature_browser/{{site}}/{{cell}}.tsv"
    conda:
        "../../envs/saesweep.yaml"
    threads: 2
    resources:
        mem_mb=evaluate_mem_mb,
        runtime=budget.EVALUATE_RUNTIME_MIN,
    params:
        folder=lambda wildcards, input: Path(input.cfg).parent,
    shell:
        "saesweep features --settings {input.settings:q} --cell {params.folder:q} "
        "--out {output:q} > {log} 2>&1"
