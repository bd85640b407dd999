# The report's tables: every fitted law, and the run's configuration with its provenance.


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
