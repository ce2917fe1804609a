"""All MLflow calls, in one place: one run per (stage, variant), one experiment per params file.

The default store is a sqlite file; several stages running at once (snakemake
--cores N) would race on it ("database is locked", concurrent schema
creation), so every call to a sqlite store holds a file lock beside it.
A server URI (tracking.uri: http://...) needs no lock.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from filelock import FileLock

from .config import Params

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri(params: Params) -> str:
    return params.tracking.uri or DEFAULT_URI


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}, the form MLflow params take."""
    out: dict[str, object] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class Tracker:
    """A thin handle on one MLflow run; use `stage_run` to open one."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.run_id = run_id
        with _store_lock(uri):  # opening a store may create or migrate its tables
            self.client = MlflowClient(tracking_uri=uri)

    def _locked(self):
        return _store_lock(self.uri)

    def log_params(self, params: Mapping) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        with self._locked():
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        with self._locked():
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path) -> None:
        with self._locked():
            self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        with self._locked():
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))


def _store_lock(uri: str):
    if uri.startswith("sqlite:///"):
        return FileLock(uri.removeprefix("sqlite:///") + ".lock", timeout=600)
    return contextlib.nullcontext()


@contextlib.contextmanager
def stage_run(params: Params, stage: str, variant: str | None = None) -> Iterator[Tracker]:
    """Open an MLflow run for `stage` (and `variant`); it ends FINISHED, or FAILED if the body raises."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params)
    name = params.experiment
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            artifacts = Path("mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
            experiment_id = client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        tags = {"stage": stage, "config": params.run.name}
        if variant:
            tags["variant"] = variant
        run = client.create_run(experiment_id, run_name=f"{stage}-{variant}" if variant else stage, tags=tags)
    tracker = Tracker(uri, run.info.run_id)
    try:
        yield tracker
    except BaseException:
        with _store_lock(uri):
            client.set_terminated(run.info.run_id, status="FAILED")
        raise
    with _store_lock(uri):
        client.set_terminated(run.info.run_id, status="FINISHED")
    log.info("mlflow: %s run %s in experiment %r at %s", stage, run.info.run_id[:8], name, uri)
