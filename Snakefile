from snakemake.utils import min_version

min_version("9.0")


# The default sweep, unless --configfile names another: a config given on the command line
# replaces it whole (Snakemake would otherwise merge the two, e.g. both files' grids).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/external.smk"
include: "workflow/rules/scaling.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        final_targets(),
