rule fetch:
    output:
        corpus=f"{RESULTS}/data/corpus.bin",
    params:
        data=section("data"),
    log:
        f"{LOGS}/fetch.log",
    shell:
        f"{stage('fetch')} --out {{output.corpus}} 2>&1 | tee {{log}}"


rule prepare:
    input:
        corpus=rules.fetch.output.corpus,
    output:
        train=f"{RESULTS}/data/prepared/train.bin",
        val=f"{RESULTS}/data/prepared/val.bin",
        test=f"{RESULTS}/data/prepared/test.bin",
        manifest=f"{RESULTS}/data/prepared/manifest.json",
    params:
        max_bytes=section("data", "max_bytes"),
        splits=section("data", "splits"),
    log:
        f"{LOGS}/prepare.log",
    shell:
        f"{stage('prepare')} --corpus {{input.corpus}} --out {RESULTS}/data/prepared 2>&1 | tee {{log}}"
