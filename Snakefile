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
        rules.report.output,
