# One training job per cell; its settings file is the single source of truth for the cell.


rule cell_settings:
    output:
        f"{RUN}/cells/{{site}}/{{cell}}/{{stage}}_settings.json",
    log:
        f"{RUN}/logs/cell_settings/{{site}}/{{cell}}-{{stage}}.log",
    localrule: True
    conda:
        "../../envs/saesweep.yaml"
    params:
        settings=settings_json,
    shell:
        "saesweep settings --json {params.settings:q} --out {output:q} > {log} 2>&1"


rule train_cell:
    input:
        settings=f"{RUN}/cells/{{site}}/{{cell}}/train_settings.json",
        activations=f"{RUN}/activations/{{site}}/manifest.json",
        heldout=f"{RUN}/activations/{{site}}-eval/manifest.json",
    output:
        weights=f"{RUN}/cells/{{site}}/{{cell}}/sae.safetensors",
        cfg=f"{RUN}/cells/{{site}}/{{cell}}/cfg.json",
        train_log=f"{RUN}/cells/{{site}}/{{cell}}/train_log.parquet",
    log:
        f"{RUN}/logs/train_cell/{{site}}/{{cell}}.log",
    benchmark:
        f"{RUN}/benchmarks/train_cell/{{site}}/{{cell}}.tsv"
    conda:
        "../../envs/saesweep.yaml"
    threads: 2
    resources:
        mem_mb=train_mem_mb,
        runtime=train_runtime,
    params:
        folder=lambda wildcards, output: Path(output.cfg).parent,
    shell:
        "saesweep train --settings {input.settings:q} --out {params.folder:q} "
        "--threads {threads} > {log} 2>&1"
