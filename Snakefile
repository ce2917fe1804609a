# attnbench: snakemake --cores all  (a preset: add --configfile workflow/presets/<name>.yaml)
# The stages are the package's CLI; this file and dvc.yaml only wire them together.


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/variant.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/benchmark.smk"


rule all:
    default_target: True
    input:
        # The report's inputs too: a clone ships the generated report, and Snakemake would not
        # rebuild an existing target whose inputs are only missing (a fresh clone ran nothing).
        rules.report.input,
        rules.report.output,
