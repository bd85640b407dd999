# SAEs trained elsewhere (config key external): imported into saesweep's format, then
# evaluated by the same stage as a cell, on the same held-out tokens of their site.


rule external_settings:
    output:
        f"{RUN}/external/{{site}}/{{name}}/{{external_stage}}_settings.json",
    log:
        f"{RUN}/logs/external_settings/{{site}}/{{name}}-{{external_stage}}.log",
    localrule: True
    conda:
        "../../envs/saesweep.yaml"
    params:
        settings=external_settings_json,
    shell:
        "saesweep settings --json {params.settings:q} --out {output:q} > {log} 2>&1"


rule import_external:
    input:
        external_files,
        settings=f"{RUN}/external/{{site}}/{{name}}/import_settings.json",
        activations=f"{RUN}/activations/{{site}}-eval/manifest.json",
    output:
        weights=f"{RUN}/external/{{site}}/{{name}}/sae.safetensors",
        cfg=f"{RUN}/external/{{site}}/{{name}}/cfg.json",
    log:
        f"{RUN}/logs/import_external/{{site}}/{{name}}.log",
    conda:
        "../../envs/saesweep.yaml"
    params:
        folder=lambda wildcards, output: Path(output.cfg).parent,
    shell:
        "saesweep import --settings {input.settings:q} --out {params.folder:q} > {log} 2>&1"


rule evaluate_external:
    input:
        MODEL_INPUT,
        settings=f"{RUN}/external/{{site}}/{{name}}/eval_settings.json",
        weights=rules.import_external.output.weights,
        cfg=rules.import_external.output.cfg,
        activations=f"{RUN}/activations/{{site}}-eval/manifest.json",
    output:
        f"{RUN}/external/{{site}}/{{name}}/metrics.json",
    log:
        f"{RUN}/logs/evaluate_external/{{site}}/{{name}}.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate_external/{{site}}/{{name}}.tsv"
    conda:
        "../../envs/saesweep.yaml"
    threads: 2
    resources:
        mem_mb=external_evaluate_mem_mb,
        runtime=budget.EVALUATE_RUNTIME_MIN,
    params:
        folder=lambda wildcards, input: Path(input.cfg).parent,
    shell:
        "saesweep evaluate --settings {input.settings:q} --cell {params.folder:q} "
        "--out {output:q} > {log} 2>&1"
