# One LM pass per split writes the shards of every site: training tokens and held-out tokens.


rule extraction_settings:
    output:
        f"{RUN}/activations/{{stage}}_settings.json",
    log:
        f"{RUN}/logs/extraction_settings/{{stage}}.log",
    localrule: True
    conda:
        "../../envs/saesweep.yaml"
    params:
        settings=lambda wildcards: json.dumps(
            job.extraction_settings(config, wildcards.stage), sort_keys=True
        ),
    shell:
        "saesweep settings --json {params.settings:q} --out {output:q} > {log} 2>&1"


for stage in ("train", "eval"):

    rule:
        name:
            f"extract_{stage}_activations"
        input:
            MODEL_INPUT,
            corpus=rules.prepare_corpus.output,
            settings=f"{RUN}/activations/{stage}_settings.json",
        output:
            all_manifests(stage),
        log:
            f"{RUN}/logs/extract_activations/{stage}.log",
        benchmark:
            f"{RUN}/benchmarks/extract_activations/{stage}.tsv"
        conda:
            "../../envs/saesweep.yaml"
        threads: 2
        resources:
            mem_mb=lambda wildcards: budget.extract_mem_mb(width()),
        shell:
            "saesweep extract --settings {input.settings:q} > {log} 2>&1"
