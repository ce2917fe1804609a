"""All MLflow calls, in one place: one run per (stage, variant), one experiment per params file.

The default store is a sqlite file; several stages running at once (snakemake
--cores N) would race on it ("database is locked", concurrent schema
creation), so every call to a sqlite store holds a file lock beside it.
A server URI (tracking.uri: http://...) needs no lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import requests
from filelock import FileLock

from .config import Params
from .signals import held

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
# MLflow's telemetry sends usage records from a thread of each process that imports it: a network lookup from every
# stage, on machines that are often offline. In CI such a thread segfaulted inside getaddrinfo and took a training
# stage down with it (faulthandler's frames, stop 54). Off, unless the user sets the variable themselves.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


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


# MLflow's client retries a failed call for over 4 minutes by default (7 retries, backoff doubling from 2 s, 120 s
# timeouts), which stalled a training loop whose server had gone. Inside a stage's run these bound a call to seconds
# (a refused connection) or about 35 s (a server that hangs); the variables, where set, win.
RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# After a failed call the run's calls are left out for a minute, then for twice as long after each further failure.
RETRY_AFTER, RETRY_AFTER_MAX = 60.0, 960.0
# MLflow's error codes for a store that is down, overloaded or locked (a connection error comes as INTERNAL_ERROR);
# any other (a bad metric name, say) is the call's own fault and is raised.
UNAVAILABLE = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}


def unavailable(err: Exception) -> bool:
    """Whether `err` says the store could not be reached or could not take the call now."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in UNAVAILABLE
    # Not every OSError: a missing artifact file is the call's own fault. (The store lock's Timeout is a TimeoutError.)
    return isinstance(err, (ConnectionError, TimeoutError, requests.RequestException))


@contextlib.contextmanager
def bounded_retries() -> Iterator[None]:
    """RETRY_DEFAULTS in the environment for the duration, the variables already set kept, the rest removed after."""
    added = [variable for variable in RETRY_DEFAULTS if variable not in os.environ]
    os.environ.update({variable: RETRY_DEFAULTS[variable] for variable in added})
    try:
        yield
    finally:
        for variable in added:
            os.environ.pop(variable, None)


class Tracker:
    """A thin handle on one MLflow run; use `stage_run` to open one.

    Once the run is open, a store that becomes unavailable (a server gone mid-run, a store locked too long) costs
    warnings, not the stage: its own files hold every figure it logs, and Snakemake deletes a failed job's outputs,
    which would cost a whole training for a log line. After a failed call the run's calls are left out for a while
    (RETRY_AFTER, doubling while the store stays away), then tried again; stage_run's last line counts the lost."""

    def __init__(self, client, uri: str, run_id: str):
        self.client = client
        self.uri = uri
        self.run_id = run_id
        self.lost = 0  # calls that failed or were left out
        self.pause = 0.0  # seconds calls are left out after the last failure; 0 while calls land
        self.retry_at = 0.0

    def _call(self, what: str, fn: Callable, *args, **kwargs) -> None:
        """fn(*args, **kwargs) as `_store_access` makes it; an unavailable store warns (at the first failure of a run of
        them) instead of raising."""
        if time.monotonic() < self.retry_at:
            self.lost += 1
            return
        try:
            with _store_access(self.uri):
                fn(*args, **kwargs)
        except Exception as err:
            if not unavailable(err):
                raise
            self.lost += 1
            if not self.pause:
                reason = " ".join(str(err).split())
                log.warning("mlflow: %s did not reach %s (%s: ...%s); the stage goes on, its files hold every figure, "
                            "and the run's calls are left out for %.0f s", what, self.uri, type(err).__name__, reason[-160:], RETRY_AFTER)
            self.pause = min(2 * self.pause, RETRY_AFTER_MAX) if self.pause else RETRY_AFTER
            self.retry_at = time.monotonic() + self.pause
        else:
            self.pause = 0.0

    def log_params(self, params: Mapping) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self._call("params", self.client.log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        self._call("metrics", self.client.log_batch, self.run_id, metrics=items)

    def log_artifact(self, path: str | Path) -> None:
        self._call(f"artifact {Path(path).name}", self.client.log_artifact, self.run_id, str(path))

    def end(self, status: str) -> None:
        """The run's final status (FINISHED, KILLED or FAILED), worth one more try after a failed call."""
        self.retry_at = 0.0
        self._call("the run's status", self.client.set_terminated, self.run_id, status=status)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def check_server(uri: str, connect_timeout: float = 5.0, answer_timeout: float = 60.0) -> None:
    """Fail fast, naming tracking.uri, where an http(s) store is not an MLflow server that answers: MLflow's client
    would retry for minutes before saying so (4 min 10 s against a closed port, about 15 min against a server that
    takes the connection and never answers), and without naming the setting. A slow answer is waited for up to
    `answer_timeout` (a server busy while many stages start). Left to MLflow's client, which may get through where
    this bare probe cannot: a TLS handshake that needs MLflow's certificate settings, and a request for
    credentials (401, 403, or a redirect to a login page)."""
    if not uri.startswith(("http://", "https://")):
        return
    probe = "/api/2.0/mlflow/experiments/get-by-name"  # a store's plainest call: every MLflow server answers it in JSON
    fix = "start one (README: An MLflow server) or set tracking.uri: null for the local store"
    try:
        answer = requests.get(f"{uri.rstrip('/')}{probe}", params={"experiment_name": "attnbench"},
                              timeout=(connect_timeout, answer_timeout), allow_redirects=False)
    except requests.exceptions.SSLError:
        return
    except requests.exceptions.ReadTimeout:
        raise ConnectionError(f"tracking.uri = {uri!r}: the server took the connection but sent no answer in "
                              f"{answer_timeout:g} s; check that it is an MLflow server and runs, or {fix}") from None
    except requests.ConnectionError as err:  # refused, unresolvable, or no connection within the timeout
        raise ConnectionError(f"tracking.uri = {uri!r}: no server answers ({type(err).__name__}); {fix}") from None
    if answer.status_code in (401, 403) or 300 <= answer.status_code < 400:
        return
    if answer.status_code >= 500:
        raise ConnectionError(f"tracking.uri = {uri!r}: HTTP {answer.status_code} from the server or a proxy before it "
                              f"(GET {probe}); check that the MLflow server runs, or {fix}")
    try:
        body = answer.json()
    except ValueError:
        body = None
    # A 200 names the experiment; MLflow's errors carry an error_code (404 RESOURCE_DOES_NOT_EXIST here).
    if not isinstance(body, dict) or not ({"experiment", "error_code"} & body.keys()):
        raise ConnectionError(f"tracking.uri = {uri!r}: a server answers, but not MLflow's (GET {probe}: HTTP "
                              f"{answer.status_code}, {answer.headers.get('Content-Type', 'no content type')}); {fix}")


def sqlite_file(uri: str) -> str | None:
    """The file of a sqlite store's URI (sqlite:///path, or with a driver: sqlite+pysqlite:///path), else None."""
    scheme, _, rest = uri.partition(":///")
    return rest if rest and scheme.partition("+")[0] == "sqlite" else None


def _store_lock(uri: str):
    path = sqlite_file(uri)
    return FileLock(path + ".lock", timeout=600) if path is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _store_access(uri: str) -> Iterator[None]:
    """Calls to the store: a sqlite store's under its file lock, with SIGINT and SIGTERM held until they return
    (`signals.held`: a statement stopped halfway left its connection holding the database's lock, so the run's final
    status waited 20 s for it and was lost). A server's calls stay interruptible: one to a hung server takes about 35 s
    to fail (RETRY_DEFAULTS), longer than a SIGTERM's grace."""
    with _store_lock(uri), (held() if sqlite_file(uri) is not None else contextlib.nullcontext()):
        yield


def _experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created (artifacts under ./mlartifacts for a local store) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    artifacts = Path("mlartifacts").resolve().as_uri() if sqlite_file(uri) is not None else None
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except MlflowException as err:  # a server store is not locked: another stage may have created it just now
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def git_tags(package: Path = Path(__file__).parent) -> dict[str, str]:
    """The commit of the Git tree whose tracked files `package` is, under MLflow's own tag (its UI shows it), and
    whether the package's tracked files differ from it (`package_modified`), so that runs of different code in one
    experiment can be told apart; none where the package is no tracked part of a Git tree (an installed copy, even
    one inside a repository's ignored folder). Reads only: no index lock, undecodable names replaced."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=package, capture_output=True, text=True,
                                  errors="replace", timeout=10, check=True).stdout.strip()

        git("ls-files", "--error-unmatch", "__init__.py")
        commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "package_modified": str(bool(changes)).lower()}


@contextlib.contextmanager
def stage_run(params: Params, stage: str, variant: str | None = None) -> Iterator[Tracker]:
    """Open an MLflow run for `stage` (and `variant`); it ends FINISHED, KILLED if the body is interrupted (SIGINT,
    SIGTERM through the CLI), or FAILED if it raises anything else. A store that cannot be reached stops the stage
    here, before any work; one lost once the run is open costs only log lines (Tracker)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params)
    check_server(uri)
    name = params.experiment
    code = git_tags()  # before the store's lock: other stages wait on it
    tracker = None
    try:
        with _store_access(uri):
            client = MlflowClient(tracking_uri=uri)
            experiment_id = _experiment_id(client, name, uri)
            tags = {"stage": stage, "config": params.run.name} | code
            if variant:
                tags["variant"] = variant
            # Under `dvc exp run` the experiment's name and baseline commit (DVC's variables): what `dvc exp apply` takes.
            tags |= {v.lower(): os.environ[v] for v in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV") if v in os.environ}
            run = client.create_run(experiment_id, run_name=f"{stage}-{variant}" if variant else stage, tags=tags)
            tracker = Tracker(client, uri, run.info.run_id)
    except KeyboardInterrupt:  # held over the run's creation, raised as the block ended: the new run ends KILLED
        if tracker is not None:
            tracker.end("KILLED")
        raise
    status = "FAILED"
    try:
        with bounded_retries():
            try:
                yield tracker
                status = "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                if status == "KILLED" and tracker.pause:
                    tracker.lost += 1  # the store is away, and a SIGTERM's grace is shorter than a call to a hung server
                else:
                    tracker.end(status)
    finally:
        if tracker.lost:
            log.warning("mlflow: %s run %s in experiment %r at %s lacks %d of its calls (params, metrics, artifacts or "
                        "its status, %s here); the stage's files have them", stage, run.info.run_id[:8], name, uri,
                        tracker.lost, status)
        else:
            log.info("mlflow: %s run %s in experiment %r at %s", stage, run.info.run_id[:8], name, uri)


def import_runs(params: Params, source_uri: str) -> int:
    """Copy the runs of this params file's experiment from another store (e.g. a GPU machine's sqlite file)
    into the configured one: name, tags, params, every metric's history and the final status. A run already
    imported (tag attnbench.source_run) is skipped, so importing twice adds nothing. Returns the runs added."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    source_file = sqlite_file(source_uri)
    if source_file is not None and not Path(source_file).is_file():  # MLflow would create an empty store there
        raise ValueError(f"--from {source_uri}: no such file {source_file!r}")
    source = MlflowClient(tracking_uri=source_uri)
    source_experiment = source.get_experiment_by_name(params.experiment)
    if source_experiment is None:
        raise ValueError(f"{source_uri} has no experiment {params.experiment!r}")
    uri = tracking_uri(params)
    check_server(uri)
    with _store_access(uri):
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, params.experiment, uri)
        done = {r.data.tags["attnbench.source_run"] for r in client.search_runs([experiment_id], "tags.`attnbench.source_run` != ''", max_results=50_000)}
    added = 0
    runs = source.search_runs([source_experiment.experiment_id], max_results=50_000)
    for run in runs:
        if run.info.run_id in done:
            continue
        tags = [RunTag(k, v) for k, v in run.data.tags.items() if not k.startswith("mlflow.")] + [RunTag("attnbench.source_run", run.info.run_id)]
        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for key in run.data.metrics for m in source.get_metric_history(run.info.run_id, key)]
        with _store_access(uri):
            new = client.create_run(experiment_id, start_time=run.info.start_time, run_name=run.info.run_name)
            client.log_batch(new.info.run_id, tags=tags, params=[Param(k, v) for k, v in run.data.params.items()])
            for start in range(0, len(metrics), 1000):
                client.log_batch(new.info.run_id, metrics=metrics[start : start + 1000])
            client.set_terminated(new.info.run_id, status=run.info.status, end_time=run.info.end_time)
        added += 1
    log.info("imported %d of the %d runs of %r in %s into %s (the others were there already)", added, len(runs), params.experiment, source_uri, uri)
    return added
