"""The two front ends: Snakemake and DVC declare the same DAG, run it end to end, and re-run only what changed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnbench.files import read_json
from attnbench.report import FIGURES
from attnbench.sources import stage_sources, variant_sources
from tests.tiny import REPO, merge, write_params

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
FRONT_ENDS = ("Snakefile", "workflow", "dvc.yaml", ".dvcignore")


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def snakemake_stages(cwd: Path) -> dict[str, dict[str, set[str] | str]]:
    """{stage: {"outs", "deps", "cmd"}} from a forced dry run's job list, named like DVC's stages (train@mha):
    the default DAG plus the GPU benchmark target, as DVC's index holds both dvc.yaml files.

    A dry run needs no outputs or metadata, so this reads the declarations, not the state of a past run."""
    out = run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--cores", "1", "all", "benchmark"], cwd)
    stages: dict[str, dict] = {}
    for block in re.split(r"^rule ", out, flags=re.M)[1:]:
        rule = block.split(":", 1)[0]
        if rule == "all":  # the default target, no stage
            continue
        fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.M))
        command = re.search(r"^Shell command: (.*)$", block, re.M)
        assert command is not None, f"rule {rule}: no shell command in the dry run"
        variant = re.search(r"variant=([\w-]+)", fields.get("wildcards", ""))
        name = f"{rule}@{variant.group(1)}" if variant else rule
        stages[name] = {
            "outs": set(fields.get("output", "").split(", ")) - {""},
            "deps": set(fields.get("input", "").split(", ")) - {""},
            "cmd": command.group(1).split(" 2>&1")[0].strip(),
        }
    return stages


def dvc_stages(cwd: Path) -> dict[str, dict[str, set[str] | str]]:
    """The same view of the dvc.yaml files, file dependencies only (DVC also lists the params file);
    a stage of another dvc.yaml than the root's by its name alone (workflow/benchmark/dvc.yaml:benchmark)."""
    from dvc.repo import Repo

    stages = {}
    with Repo(str(cwd)) as repo:
        for stage in repo.index.stages:
            deps = {str(d.def_path) for d in stage.deps if not str(d.def_path).endswith(".yaml")}
            stages[stage.addressing.split(":")[-1]] = {"outs": {str(o.def_path) for o in stage.outs}, "deps": deps, "cmd": stage.cmd}
    return stages


def covered(path: str, by: set[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in by)


def test_snakemake_and_dvc_declare_the_same_dag():
    """The same stages, but DVC's `check`: Snakemake validates the whole params file whenever it starts."""
    smk, dvc = snakemake_stages(REPO), dvc_stages(REPO)
    assert dvc.pop("check")["cmd"] == "python -m attnbench check --params params.yaml"
    assert smk.keys() == dvc.keys(), f"stages differ: snakemake {sorted(smk)} vs dvc {sorted(dvc)}"
    for name in smk:
        assert smk[name]["cmd"] == dvc[name]["cmd"], f"{name}: commands differ"
        # DVC may declare a folder where Snakemake lists its files (report's outputs and its variants dependency).
        assert all(covered(p, dvc[name]["outs"]) for p in smk[name]["outs"]), f"{name}: outputs {smk[name]['outs']} vs {dvc[name]['outs']}"
        assert all(any(covered(s, {p}) for s in smk[name]["outs"]) for p in dvc[name]["outs"]), f"{name}: dvc outputs"
        assert all(covered(p, dvc[name]["deps"]) for p in smk[name]["deps"]), f"{name}: inputs {smk[name]['deps']} vs {dvc[name]['deps']}"
        assert all(any(covered(s, {p}) for s in smk[name]["deps"]) for p in dvc[name]["deps"]), f"{name}: dvc inputs"


def test_stages_declare_the_code_they_run():
    """Each Snakemake job lists as inputs exactly the package's files its stage runs (and the sources stage its
    variant's too); the test above holds DVC's lists to the same (DVC names a folder where it cannot list files)."""
    for name, stage in snakemake_stages(REPO).items():
        rule, _, variant = name.partition("@")
        expected = set(stage_sources(rule)) | (set(variant_sources(variant)) if rule == "sources" else set())
        declared = {path for path in stage["deps"] if path.startswith("src/")}
        assert declared == expected, f"{name}: missing {expected - declared}, extra {declared - expected}"


def test_dvc_train_stage_declares_every_train_key_but_nproc():
    """Snakemake's train rule takes the train section but nproc; DVC cannot exclude a key, so dvc.yaml lists the
    others, and a key added to the schema must be added there too (or changing it would re-run nothing)."""
    from attnbench.config import TrainConfig

    train = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]["params"]
    declared = {key.removeprefix("train.") for key in train if key.startswith("train.")}
    assert declared == set(TrainConfig.model_fields) - {"nproc"}, declared ^ (set(TrainConfig.model_fields) - {"nproc"})


def test_params_files_spell_out_every_key_dvc_reads():
    """DVC refuses a stage whose params key the file lacks (the schema's default does not count), and a preset is
    copied to params.yaml to run under DVC: params.yaml and every preset hold each key the dvc.yaml files list."""
    listed = set()
    for dvc_file in (REPO / "dvc.yaml", REPO / "workflow/benchmark/dvc.yaml"):
        for stage in yaml.safe_load(dvc_file.read_text())["stages"].values():
            listed |= {key for key in stage.get("do", stage).get("params", []) if isinstance(key, str) and "${" not in key}
    for params_file in [REPO / "params.yaml", *sorted((REPO / "workflow/presets").glob("*.yaml"))]:
        raw = yaml.safe_load(params_file.read_text())

        def has(node, keys):
            return not keys or (isinstance(node, dict) and keys[0] in node and has(node[keys[0]], keys[1:]))

        missing = sorted(key for key in listed if not has(raw, key.split(".")))
        assert not missing, f"{params_file.relative_to(REPO)} lacks {missing}"


def edit_code(ws: Path, module: str) -> None:
    """A change to one module of the variants package (a comment: the manifest digests the text)."""
    path = ws / "src" / "attnbench" / "variants" / f"{module}.py"
    path.write_text(path.read_text() + "\n# an edit\n")


# The one lint allowed: rules name no conda env or container, because the environment is this
# package itself (`pip install -e .`), the same for every rule.
ALLOWED_LINTS = {"Specify a conda environment or container for each rule."}


def test_snakefile_passes_lint():
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--cores", "1"], cwd=REPO, env=ENV, capture_output=True, text=True)
    lints = set(re.findall(r"^\s+\* (.+?):?$", proc.stdout + proc.stderr, re.M))
    assert lints <= ALLOWED_LINTS, f"snakemake --lint: {lints - ALLOWED_LINTS}"


def test_rule_files_are_formatted():
    run(["snakefmt", "--check", "Snakefile", "workflow/rules"], REPO)


def workspace(tmp_path: Path, overrides: dict | None = None) -> Path:
    """A copy of the front ends with a tiny params.yaml, as a new user's clone would hold them."""
    for name in FRONT_ENDS:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_params(tmp_path, merge({"profile": {"whole_model": False}}, overrides or {}))
    return tmp_path


def snakemake_error(ws: Path, *args: str) -> str:
    """The one line a refused `snakemake -n` prints, besides Snakemake's notice that --configfile extends the config."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args], cwd=ws, env=ENV,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line and not line.startswith("Config file ")]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("attnbench: error: "), proc.stdout + proc.stderr
    return lines[0]


def test_snakemake_refuses_config_overrides_and_bad_params_in_one_line_and_declares_a_local_corpus(tmp_path):
    """--config values would be left out of every stage (the params come from one file), and a bad params file
    stops the run before any job: each in one line, without Snakemake's traceback. A local source's file is fetch's
    input, so editing it in place re-runs the DAG."""
    ws = workspace(tmp_path)  # the tiny params: source local, corpus.txt
    assert "--config run: not read; the params come from one file" in snakemake_error(ws, "--config", "run={name: other}")
    bad = ws / "bad.yaml"
    bad.write_text((ws / "params.yaml").read_text().replace("d_model: 32", "d_model: big"))
    assert "bad.yaml: model.d_model = 'big': Input should be a valid integer" in snakemake_error(ws, "--configfile", str(bad))
    plan = run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--forceall", "fetch"], ws)
    assert re.search(r"^    input: .*\bcorpus\.txt\b", plan.split("rule fetch:")[1], re.M), plan


def set_param(params: Path, *keys: str, value) -> None:
    """params[keys[0]][keys[1]]... = value in the params file."""
    raw = yaml.safe_load(params.read_text())
    node = raw
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def job_counts(dry_run_output: str) -> dict[str, int]:
    """Rule -> job count from a Snakemake dry run's 'Job stats' table."""
    table = dry_run_output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.mark.slow
def test_snakemake_runs_the_dag_then_only_what_a_change_touches(tmp_path):
    ws = workspace(tmp_path)
    # A clone holds the generated report of a past run (reports/ is committed) and no results.
    shipped = [ws / "reports" / "tiny" / "comparison.md"] + [ws / "reports" / "tiny" / "figures" / f"{name}.png" for name in FIGURES]
    for path in shipped:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a past run's report")
    run([sys.executable, "-m", "snakemake", "--cores", "2"], ws)
    report = (ws / "reports" / "tiny" / "comparison.md").read_text()
    assert "| mha |" in report and "| la |" in report
    assert len(list((ws / "reports" / "tiny" / "figures").glob("*.png"))) == 4
    assert "Nothing to be done" in run([sys.executable, "-m", "snakemake", "--cores", "2"], ws)
    # The default params file named by the user, as it is or absolute: the same commands (a user's check saw all re-run).
    for name in ("params.yaml", str(ws / "params.yaml")):
        assert "Nothing to be done" in run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "--configfile", name], ws)

    # A changed option is planned, not run (the code change below runs the same stages; each run costs CI time).
    set_param(ws / "params.yaml", "variants", "la", "chunk", value=8)
    planned = job_counts(run([sys.executable, "-m", "snakemake", "-n", "--cores", "2"], ws))
    assert planned == {"train": 1, "evaluate": 1, "profile": 1, "report": 1, "all": 1}, planned
    set_param(ws / "params.yaml", "variants", "la", "chunk", value="auto")  # the value it had: nothing to re-run
    assert "Nothing to be done" in run([sys.executable, "-m", "snakemake", "-n", "--cores", "2"], ws)
    set_param(ws / "params.yaml", "train", "device", value="cpu")  # the profile measures on train.device, though it reads no trained model
    planned = job_counts(run([sys.executable, "-m", "snakemake", "-n", "--cores", "2"], ws))
    assert planned == {"train": 2, "evaluate": 2, "profile": 2, "report": 1, "all": 1}, planned
    set_param(ws / "params.yaml", "train", "device", value="auto")
    splits = yaml.safe_load((ws / "params.yaml").read_text())["data"]["splits"]
    set_param(ws / "params.yaml", "data", "splits", value={"train": 0.8, "val": 0.1, "test": 0.1})  # prepare's, not fetch's
    planned = job_counts(run([sys.executable, "-m", "snakemake", "-n", "--cores", "2"], ws))
    assert planned == {"prepare": 1, "train": 2, "evaluate": 2, "report": 1, "all": 1}, planned
    set_param(ws / "params.yaml", "data", "splits", value=splits)
    # A code change is planned too, with the commands it would run (the DVC test re-runs one: 45 s of CI time each).
    edit_code(ws, "la")
    plan = run([sys.executable, "-m", "snakemake", "-n", "--printshellcmds", "--cores", "2"], ws)
    la_only = {"sources": 1, "train": 1, "evaluate": 1, "profile": 1, "report": 1, "all": 1}
    assert job_counts(plan) == la_only, plan
    assert "--variant la" in plan and "--variant mha" not in plan
    edit_code(ws, "__init__")  # the registry, where a new variant is one line: no other variant joins the plan
    planned = job_counts(run([sys.executable, "-m", "snakemake", "-n", "--cores", "2"], ws))
    assert planned == la_only, planned

    # Every stage and variant left one finished MLflow run, with the training curve as step-wise metrics.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("attnbench/tiny")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names.count("train-la") == 1 and names.count("train-mha") == 1
    assert {"fetch", "prepare", "report", "evaluate-mha", "profile-mha", "evaluate-la", "profile-la"} <= set(names)
    assert all(r.info.status == "FINISHED" for r in runs)
    train_run = next(r for r in runs if r.info.run_name == "train-mha")
    assert len(client.get_metric_history(train_run.info.run_id, "val_bpb")) == 3
    assert train_run.data.params["model.d_model"] == "32"
    evaluate_run = next(r for r in runs if r.info.run_name == "evaluate-mha")  # which configuration trained what it scored
    assert {k: evaluate_run.data.params[k] for k in ("model.d_model", "train.lr")} == {"model.d_model": "32", "train.lr": "0.003"}
    # The run's figure is train.json's (the median window), not the last window's, which MLflow shows for a series.
    summary = read_json(ws / "results" / "tiny" / "variants" / "mha" / "train.json")
    assert train_run.data.metrics["tokens_per_s"] == pytest.approx(summary["tokens_per_s"], rel=1e-12)
    assert len(client.get_metric_history(train_run.info.run_id, "tokens_per_s_window")) == 6


@pytest.mark.slow
def test_dvc_repro_runs_the_dag_then_only_what_a_change_touches(tmp_path):
    ws = workspace(tmp_path)
    run(["dvc", "init", "--no-scm", "-q"], ws)
    run(["dvc", "repro"], ws)
    report = (ws / "reports" / "tiny" / "comparison.md").read_text()
    assert "| mha |" in report and "| la |" in report
    assert "up to date" in run(["dvc", "status", "dvc.yaml"], ws)
    # Across all dvc.yaml files, only the GPU benchmark (never run here) is pending.
    pending = re.findall(r"^(\S+):$", run(["dvc", "status"], ws), re.M)
    assert pending == ["workflow/benchmark/dvc.yaml:benchmark"], pending

    # A changed option is planned, not run (the code change below runs the same stages; each run costs CI time).
    set_param(ws / "params.yaml", "variants", "la", "chunk", value=8)
    status = run(["dvc", "status", "dvc.yaml"], ws)
    assert "train@la" in status and "profile@la" in status and "@mha" not in status, status
    set_param(ws / "params.yaml", "variants", "la", "chunk", value="auto")  # the value it had: nothing to re-run
    assert "up to date" in run(["dvc", "status", "dvc.yaml"], ws)
    set_param(ws / "params.yaml", "train", "device", value="cpu")  # the profile measures on train.device, though it reads no trained model
    status = run(["dvc", "status", "dvc.yaml"], ws)
    assert "profile@la" in status and "profile@mha" in status, status
    set_param(ws / "params.yaml", "train", "device", value="auto")
    # Every variant's manifest is written again, but only la's changed: mha's stages do not re-run.
    edit_code(ws, "la")
    ran = set(re.findall(r"Running stage '([^']+)'", run(["dvc", "repro"], ws)))
    assert ran == {"sources@mha", "sources@la", "train@la", "evaluate@la", "profile@la", "report"}, ran
    edit_code(ws, "__init__")  # the registry, where a new variant is one line: no other variant re-runs
    manifest = ws / "results" / "tiny" / "variants" / "mha" / "sources.json"
    stamp = manifest.stat().st_mtime_ns
    ran = set(re.findall(r"Running stage '([^']+)'", run(["dvc", "repro"], ws)))
    assert ran == {"sources@mha", "sources@la"}, ran
    assert manifest.stat().st_mtime_ns == stamp  # unchanged, so not written: Snakemake sees no newer input either

    # A key no stage reads is no stage's param, but the check stage lists the whole file: refused, not "up to date".
    set_param(ws / "params.yaml", "train", "stepz", value=5)
    proc = subprocess.run(["dvc", "repro"], cwd=ws, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "train.stepz: unknown key (did you mean 'steps'?)" in proc.stdout + proc.stderr
    assert set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr)) == {"check"}
