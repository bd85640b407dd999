# One evaluation job per cell, on held-out tokens only.


rule evaluate_cell:
    input:
        MODEL_INPUT,
        settings=f"{RUN}/cells/{{site}}/{{cell}}/eval_settings.json",
        weights=rules.train_cell.output.weights,
        cfg=rules.train_cell.output.cfg,
        activations=f"{RUN}/activations/{{site}}-eval/manifest.json",
    output:
        f"{RUN}/cells/{{site}}/{{cell}}/metrics.json",
    log:
        f"{RUN}/logs/evaluate_cell/{{site}}/{{cell}}.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate_cell/{{site}}/{{cell}}.tsv"
    conda:
        "../../envs/saesweep.yaml"
    threads: 2
    resources:
        mem_mb=evaluate_mem_mb,
        runtime=budget.EVALUATE_RUNTIME_MIN,
    params:
        folder=lambda wildcards, input: Path(input.cfg).parent,
    shell:
        "saesweep evaluate --settings {input.settings:q} --cell {params.folder:q} "
        "--out {output:q} > {log} 2>&1"
