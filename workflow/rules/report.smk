# The report's tables: every fitted law, the run's configuration with its provenance, and the
# architectures compared at matched L0.


rule report_tables:
    input:
        rules.fit_laws.output,
    output:
        fits_csv=f"{RUN}/scaling/fits.csv",
        fits_html=report(
            f"{RUN}/report/fits.html",
            caption="../report/fit_table.rst",
            category="Fits",
        ),
        config_yaml=f"{RUN}/run_config.yaml",
        config_html=report(
            f"{RUN}/report/run_config.html",
            caption="../report/run_config.rst",
            category="Run",
        ),
    log:
        f"{RUN}/logs/report_tables.log",
    localrule: True
    conda:
        "../../envs/saesweep.yaml"
    params:
        config=json.dumps(config),
    shell:
        "saesweep report-tables --fits {input:q} --config-json {params.config:q} "
        "--fits-csv {output.fits_csv:q} --fits-html {output.fits_html:q} "
        "--config-yaml {output.config_yaml:q} --config-html {output.config_html:q} > {log} 2>&1"


rule compare_architectures:
    input:
        cells=rules.aggregate.output.table,
        windows=rules.aggregate.output.windows,
    output:
        csv=f"{RUN}/scaling/architectures.csv",
        frontiers=f"{RUN}/scaling/architectures_frontiers.csv",
        html=report(
            f"{RUN}/report/architectures.html",
            caption="../report/architectures.rst",
            category="Architectures",
        ),
    log:
        f"{RUN}/logs/compare_architectures.log",
    localrule: True
    conda:
        "../../envs/saesweep.yaml"
    params:
        bootstrap=config["scaling"]["bootstrap"],
    shell:
        "saesweep compare --cells {input.cells:q} --csv {output.csv:q} "
        "--frontiers {output.frontiers:q} --html {output.html:q} "
        "--bootstrap {params.bootstrap} --windows {input.windows:q} > {log} 2>&1"


rule explorer:
    input:
        cells=rules.aggregate.output.table,
        logs=rules.aggregate.output.logs,
        fits=rules.fit_laws.output,
        architectures=rules.compare_architectures.output.csv,
    output:
        report(
            f"{RUN}/report/explorer.html",
            caption="../report/explorer.rst",
            category="Explorer",
        ),
    log:
        f"{RUN}/logs/explorer.log",
    localrule: True
    conda:
        "../../envs/saesweep.yaml"
    shell:
        "saesweep explorer --cells {input.cells:q} --logs {input.logs:q} --fits {input.fits:q} "
        "--architectures {input.architectures:q} --out {output:q} > {log} 2>&1"
