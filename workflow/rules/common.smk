import json
import os
import shlex
import sys

from snakemake.exceptions import WorkflowError

from attnbench.config import ConfigError, load_params
from attnbench.gpu_slots import visible_gpus
from attnbench.sources import stage_sources, variant_sources
from attnbench.variants import parse_entry

# Presets are complete params files: the last --configfile wins whole (Snakemake's own
# config merge would union the variant lists). Validated before any job starts.
# Named as the working directory sees it, since the name is in every job's command and Snakemake re-runs a job
# whose command changed: `--configfile params.yaml` (absolute here) re-ran the whole DAG that the default had made.
PARAMS_FILE = (
    os.path.relpath(workflow.overwrite_configfiles[-1])
    if workflow.overwrite_configfiles
    else "params.yaml"
)
# Bad params stop the run in one line, as the CLI reports them (sys.exit: a raised error would come with Snakemake's
# traceback of this file). --config values would be silently left out of every stage.
if workflow.config_settings.config:
    sys.exit(
        f"attnbench: error: --config {', '.join(workflow.config_settings.config)}: not read; the params come from one "
        "file, params.yaml or --configfile <file>: put the change there"
    )
try:
    PARAMS = load_params(PARAMS_FILE)
except ConfigError as err:
    sys.exit(f"attnbench: error: {err}")
RESULTS = str(PARAMS.results_dir)
VARIANTS = list(PARAMS.variants)
# Entries <variant>-seed<N>: their variant trained with another seed, which the benchmark does not time again.
SEEDED_ENTRIES = [v for v in VARIANTS if parse_entry(v)[1] is not None]
LOGS = f"logs/{PARAMS.run.name}"
CLI = f"python -m attnbench {{stage}} --params {shlex.quote(PARAMS_FILE)}"


def job_threads():
    """CPU threads of each train, evaluate and profile job: train.threads, handed to the job as OMP_NUM_THREADS.
    auto: --cores shared equally by this host's GPUs, or all of them without one or with train.device cpu, so
    that CPU jobs run one at a time with every core, as under dvc repro, and no CPU timing is taken beside another
    job.
    """
    if PARAMS.train.threads != "auto":
        return PARAMS.train.threads
    # A cluster executor without --cores has no total: one thread (set train.threads to ask for more).
    try:
        cores = workflow.cores
    except WorkflowError:
        return 1
    # GPU jobs run side by side, one per GPU; CPU jobs one at a time.
    gpu_jobs = len(visible_gpus()) if PARAMS.train.gpus(1) else 0
    return max(1, cores // max(1, gpu_jobs))


JOB_THREADS = job_threads()


wildcard_constraints:
    variant="|".join(VARIANTS),


def section(*keys, exclude=()):
    """A params section as JSON: a rule's `params:` entry, so that changing it re-runs the rule
    (except for the `exclude` keys: settings that do not change the rule's results)."""

    def value(wildcards):
        node = PARAMS.model_dump()
        for key in keys:
            node = node[key.format(**wildcards)]
        if exclude:
            node = {k: v for k, v in node.items() if k not in exclude}
        return json.dumps(node, sort_keys=True)

    return value


# Each job's output to the terminal and its log; -i: tee outlives a Ctrl-C, so the stage's last line (where its
# checkpoint was kept) reaches the log.
TO_LOG = "2>&1 | tee -i {log}"


def stage(name):
    return CLI.format(stage=name)
