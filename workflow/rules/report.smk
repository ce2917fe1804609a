REPORT = f"reports/{PARAMS.run.name}"


rule report:
    input:
        code=stage_sources("report"),
        curves=expand(rules.train.output.curve, variant=VARIANTS),
        summaries=expand(rules.train.output.summary, variant=VARIANTS),
        metrics=expand(rules.evaluate.output.metrics, variant=VARIANTS),
        profiles=expand(rules.profile.output.table, variant=VARIANTS),
        exponents=expand(rules.profile.output.summary, variant=VARIANTS),
        train=rules.prepare.output.train,
        test=rules.prepare.output.test,
        manifest=rules.prepare.output.manifest,
    output:
        markdown=f"{REPORT}/comparison.md",
        learning_curves=report(
            f"{REPORT}/figures/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="quality",
        ),
        pareto=report(
            f"{REPORT}/figures/bpb_vs_throughput.png",
            caption="../report/bpb_vs_throughput.rst",
            category="quality",
        ),
        time=report(
            f"{REPORT}/figures/time_vs_T.png",
            caption="../report/time_vs_T.rst",
            category="cost",
        ),
        memory=report(
            f"{REPORT}/figures/memory_vs_T.png",
            caption="../report/memory_vs_T.rst",
            category="cost",
        ),
    log:
        f"{LOGS}/report.log",
    shell:
        f"{stage('report')} --variants-dir {RESULTS}/variants --data {PREPARED} --out {REPORT} {TO_LOG}"
