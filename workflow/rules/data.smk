rule fetch:
    input:
        code=stage_sources("fetch"),
        # A local source's file: edited in place, it re-runs the DAG (DVC cannot declare it: see dvc.yaml).
        local=[PARAMS.data.path] if PARAMS.data.source == "local" else [],
    output:
        corpus=f"{RESULTS}/data/corpus.bin",
    log:
        f"{LOGS}/fetch.log",
    params:
        data=section("data", exclude=("max_bytes", "splits")),  # prepare's
    shell:
        f"{stage('fetch')} --out {{output.corpus}} {TO_LOG}"


rule prepare:
    input:
        code=stage_sources("prepare"),
        corpus=rules.fetch.output.corpus,
    output:
        train=f"{RESULTS}/data/prepared/train.bin",
        val=f"{RESULTS}/data/prepared/val.bin",
        test=f"{RESULTS}/data/prepared/test.bin",
        manifest=f"{RESULTS}/data/prepared/manifest.json",
    log:
        f"{LOGS}/prepare.log",
    params:
        max_bytes=section("data", "max_bytes"),
        splits=section("data", "splits"),
    shell:
        f"{stage('prepare')} --corpus {{input.corpus}} --out {RESULTS}/data/prepared {TO_LOG}"
