VARIANT_DIR = f"{RESULTS}/variants/{{variant}}"
VARIANT_OUT = f"{RESULTS}/variants/{{wildcards.variant}}"  # the same folder, as shell commands name it
PREPARED = f"{RESULTS}/data/prepared"


rule train:
    input:
        train=rules.prepare.output.train,
        val=rules.prepare.output.val,
        manifest=rules.prepare.output.manifest,
    output:
        model=f"{VARIANT_DIR}/model.pt",
        curve=f"{VARIANT_DIR}/curve.csv",
        summary=f"{VARIANT_DIR}/train.json",
    log:
        f"{LOGS}/train-{{variant}}.log",
    resources:
        # train.nproc data-parallel processes, one GPU each (the stage picks free ones: gpu_slots.py).
        gpu=PARAMS.train.nproc,
    params:
        model=section("model"),
        # nproc only splits the same global batches over more processes: changing it re-runs nothing.
        train=section("train", exclude=("nproc",)),
        options=section("variants", "{variant}"),
    shell:
        f"{stage('train')} --variant {{wildcards.variant}} --data {PREPARED} --out {VARIANT_OUT} 2>&1 | tee {{log}}"


rule evaluate:
    input:
        model=rules.train.output.model,
        test=rules.prepare.output.test,
        manifest=rules.prepare.output.manifest,
    output:
        metrics=f"{VARIANT_DIR}/eval.json",
    log:
        f"{LOGS}/evaluate-{{variant}}.log",
    resources:
        gpu=1,
    params:
        evaluate=section("evaluate"),
    shell:
        f"{stage('evaluate')} --variant {{wildcards.variant}} --data {PREPARED} --out {VARIANT_OUT} 2>&1 | tee {{log}}"


rule profile:
    output:
        table=f"{VARIANT_DIR}/profile.csv",
        summary=f"{VARIANT_DIR}/profile.json",
    log:
        f"{LOGS}/profile-{{variant}}.log",
    resources:
        gpu=1,
    params:
        model=section("model"),
        profile=section("profile"),
        options=section("variants", "{variant}"),
    shell:
        f"{stage('profile')} --variant {{wildcards.variant}} --out {VARIANT_OUT} 2>&1 | tee {{log}}"
