import json

from attnbench.config import load_params
from attnbench.sources import stage_sources, variant_sources

# Presets are complete params files: the last --configfile wins whole (Snakemake's own
# config merge would union the variant lists). Validated before any job starts.
PARAMS_FILE = (
    str(workflow.overwrite_configfiles[-1])
    if workflow.overwrite_configfiles
    else "params.yaml"
)
PARAMS = load_params(PARAMS_FILE)
RESULTS = str(PARAMS.results_dir)
VARIANTS = list(PARAMS.variants)
LOGS = f"logs/{PARAMS.run.name}"
CLI = f"python -m attnbench {{stage}} --params {PARAMS_FILE}"


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


def stage(name):
    return CLI.format(stage=name)
