# One LM pass per split writes the shards of every site: training tokens and held-out tokens.
# The pass may be split into part jobs (activations.extract_jobs), each writing a disjoint
# range of shards and a record; one job per split then writes the manifests from the records.


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
            to_json(job.extraction_settings(config, wildcards.stage)), sort_keys=True
        ),
    shell:
        "saesweep settings --json {params.settings:q} --out {output:q} > {log} 2>&1"


rule extract_part:
    input:
        MODEL_INPUT,
        # a synthetic run (config key synthetic) generates its rows: no text
        corpus=[] if config["synthetic"] else rules.prepare_corpus.output,
        settings=f"{RUN}/activations/{{stage}}_settings.json",
    output:
        job.extraction_part_file(config, "{stage}", "{part}"),
    log:
        f"{RUN}/logs/extract_part/{{stage}}-{{part}}.log",
    benchmark:
        f"{RUN}/benchmarks/extract_part/{{stage}}-{{part}}.tsv"
    conda:
        "../../envs/saesweep.yaml"
    threads: 2
    resources:
        mem_mb=extract_mem_mb,
    shell:
        "saesweep extract --settings {input.settings:q} --part {wildcards.part} > {log} 2>&1"


for stage in ("train", "eval"):

    rule:
        name:
            f"extract_{stage}_manifests"
        input:
            parts=extraction_parts(stage),
            settings=f"{RUN}/activations/{stage}_settings.json",
        output:
            all_manifests(stage),
        log:
            f"{RUN}/logs/extract_manifests/{stage}.log",
        conda:
            "../../envs/saesweep.yaml"
        resources:
            mem_mb=1000,
        shell:
            "saesweep extract --settings {input.settings:q} --manifests > {log} 2>&1"
