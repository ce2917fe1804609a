# GPU only, not part of `rule all`: snakemake --cores all benchmark [--configfile workflow/presets/<gpu>.yaml]
BENCHMARKS = f"reports/benchmarks/{PARAMS.run.name}"


rule benchmark:
    output:
        directory(BENCHMARKS),
    log:
        f"{LOGS}/benchmark.log",
    resources:
        gpu=1,
    shell:
        f"{stage('benchmark')} --out {BENCHMARKS} 2>&1 | tee {{log}}"
