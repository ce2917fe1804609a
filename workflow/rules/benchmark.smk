# GPU only, not part of `rule all`: snakemake --cores all benchmark [--configfile workflow/presets/<gpu>.yaml]
# (DVC: dvc repro workflow/benchmark/dvc.yaml)
BENCHMARKS = f"reports/benchmarks/{PARAMS.run.name}"


rule benchmark:
    input:
        code=stage_sources("benchmark"),
    output:
        # The run's summary alone: the pages beside it are named by device and stay when another device's run
        # (or a failed one) replaces it.
        f"{BENCHMARKS}/benchmark.json",
    log:
        f"{LOGS}/benchmark.log",
    resources:
        gpu=1,
    params:
        model=section("model"),
        benchmark=section("benchmark"),
        variants=section("variants", exclude=SEEDED_ENTRIES),
        device=section("train", "device"),
    shell:
        f"{stage('benchmark')} --out {BENCHMARKS} {TO_LOG}"
