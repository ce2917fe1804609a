VARIANT_DIR = f"{RESULTS}/variants/{{variant}}"
VARIANT_OUT = f"{RESULTS}/variants/{{wildcards.variant}}"  # the same folder, as shell commands name it
PREPARED = f"{RESULTS}/data/prepared"


rule sources:
    input:
        # Only this variant's own modules: the manifest changes, and its stages re-run, when they change.
        code=stage_sources("sources"),
        variant_code=lambda wildcards: variant_sources(wildcards.variant),
    output:
        manifest=f"{VARIANT_DIR}/sources.json",
    log:
        f"{LOGS}/sources-{{variant}}.log",
    localrule: True  # milliseconds of work: never a cluster job
    shell:
        f"{stage('sources')} --variant {{wildcards.variant}} --out {VARIANT_OUT} {TO_LOG}"


rule train:
    input:
        code=stage_sources("train"),
        sources=rules.sources.output.manifest,
        train=rules.prepare.output.train,
        val=rules.prepare.output.val,
        manifest=rules.prepare.output.manifest,
    output:
        model=f"{VARIANT_DIR}/model.pt",
        curve=f"{VARIANT_DIR}/curve.csv",
        summary=f"{VARIANT_DIR}/train.json",
    log:
        f"{LOGS}/train-{{variant}}.log",
    threads: JOB_THREADS
    resources:
        # train.nproc data-parallel processes, one GPU each (the stage picks free ones: gpu_slots.py).
        gpu=PARAMS.train.gpus(PARAMS.train.nproc),
    params:
        model=section("model"),
        # nproc only splits the same global batches over more processes: changing it re-runs nothing.
        train=section("train", exclude=("nproc",)),
        options=section("variants", "{variant}"),
    shell:
        f"{stage('train')} --variant {{wildcards.variant}} --data {PREPARED} --out {VARIANT_OUT} {TO_LOG}"


rule evaluate:
    input:
        code=stage_sources("evaluate"),
        sources=rules.sources.output.manifest,
        model=rules.train.output.model,
        test=rules.prepare.output.test,
        manifest=rules.prepare.output.manifest,
    output:
        metrics=f"{VARIANT_DIR}/eval.json",
    log:
        f"{LOGS}/evaluate-{{variant}}.log",
    threads: JOB_THREADS
    resources:
        gpu=PARAMS.train.gpus(1),
    params:
        evaluate=section("evaluate"),
        threads=section("train", "threads"),
    shell:
        f"{stage('evaluate')} --variant {{wildcards.variant}} --data {PREPARED} --out {VARIANT_OUT} {TO_LOG}"


rule profile:
    input:
        code=stage_sources("profile"),
        sources=rules.sources.output.manifest,
    output:
        table=f"{VARIANT_DIR}/profile.csv",
        summary=f"{VARIANT_DIR}/profile.json",
    log:
        f"{LOGS}/profile-{{variant}}.log",
    threads: JOB_THREADS
    resources:
        gpu=PARAMS.train.gpus(1),
    params:
        model=section("model"),
        profile=section("profile"),
        device=section("train", "device"),  # where it measures
        threads=section("train", "threads"),  # with what
        options=section("variants", "{variant}"),
    shell:
        f"{stage('profile')} --variant {{wildcards.variant}} --out {VARIANT_OUT} {TO_LOG}"
