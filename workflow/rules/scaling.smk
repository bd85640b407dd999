# The sweep's answer: one table of all cells (and external SAEs), fitted laws, figures.


rule aggregate:
    input:
        expand(f"{RUN}/cells/{{site}}/{{cell}}/metrics.json", site=SITES, cell=CELLS),
        external_metrics(),
    output:
        table=f"{RUN}/scaling/cells.parquet",
        csv=f"{RUN}/scaling/cells.csv",
        logs=f"{RUN}/scaling/train_logs.parquet",
        windows=f"{RUN}/scaling/windows.parquet",
    log:
        f"{RUN}/logs/aggregate.log",
    conda:
        "../../envs/saesweep.yaml"
    params:
        run=config["run"],
    shell:
        "saesweep aggregate --run {params.run:q} --out {output.table:q} --logs {output.logs:q} "
        "--windows {output.windows:q} "
        "{input:q} > {log} 2>&1"


rule fit_laws:
    input:
        cells=rules.aggregate.output.table,
        logs=rules.aggregate.output.logs,
    output:
        f"{RUN}/scaling/fits.json",
    log:
        f"{RUN}/logs/fit_laws.log",
    conda:
        "../../envs/saesweep.yaml"
    threads: 1
    params:
        metrics=FIT_METRICS,
        bootstrap=config["scaling"]["bootstrap"],
    shell:
        "OPENBLAS_NUM_THREADS={threads} saesweep fit --cells {input.cells:q} --logs {input.logs:q} "
        "--metrics {params.metrics:q} --bootstrap {params.bootstrap} --out {output:q} > {log} 2>&1"


rule plot_figures:
    input:
        cells=rules.aggregate.output.table,
        logs=rules.aggregate.output.logs,
        fits=rules.fit_laws.output,
        frontiers=f"{RUN}/scaling/architectures_frontiers.csv",
    output:
        [
            report(
                f"{RUN}/scaling/figures/{name}.png",
                caption=f"../report/{view}.rst",
                category="Scaling",
            )
            for name, view in FIGURES.items()
        ],
        [f"{RUN}/scaling/figures/{name}.svg" for name in FIGURES],
    log:
        f"{RUN}/logs/plot_figures.log",
    conda:
        "../../envs/saesweep.yaml"
    params:
        metrics=FIT_METRICS,
        folder=lambda wildcards, output: Path(output[0]).parent,
        title=f"{config['model']['id']} · {', '.join(SITES)} · run {config['run']}",
    shell:
        "saesweep plot --cells {input.cells:q} --logs {input.logs:q} --fits {input.fits:q} "
        "--frontiers {input.frontiers:q} "
        "--metrics {params.metrics:q} --title {params.title:q} --out-dir {params.folder:q} > {log} 2>&1"
