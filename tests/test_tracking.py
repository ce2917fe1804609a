"""MLflow: runs per stage, failure status, concurrent writers on one sqlite store, import from another store."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from attnbench import tracking
from attnbench.config import parse_params
from attnbench.signals import Terminated, sigterm_raises
from attnbench.tracking import _experiment_id, _store_lock, check_server, import_runs, sqlite_file, stage_run


def params_at(uri: str, name: str = "t"):
    return parse_params({"run": {"name": name}, "train": {"steps": 1}, "tracking": {"uri": uri}})


def runs(uri: str, experiment: str = "attnbench/t"):
    client = MlflowClient(tracking_uri=uri)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.mark.parametrize("set_by_user", [None, "false"])
def test_stages_turn_mlflows_telemetry_off_unless_the_user_set_it(set_by_user):
    """MLflow's telemetry thread made a network lookup from every stage, and one segfaulted in CI: importing the
    tracking module (every stage does, before MLflow) turns it off, and leaves a value the user set alone."""
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_DISABLE_TELEMETRY"}
    if set_by_user is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = set_by_user
    check = "import os, attnbench.tracking; print(os.environ['MLFLOW_DISABLE_TELEMETRY'])"
    out = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == (set_by_user or "true")


def test_a_failing_stage_marks_its_run_failed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(RuntimeError), stage_run(params, "train", "mha") as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
        raise RuntimeError("boom")
    _, found = runs(params.tracking.uri)
    assert [(r.info.run_name, r.info.status) for r in found] == [("train-mha", "FAILED")]


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "postgresql+psycopg2://user@host/db", "databricks", "sqlite:///m.db",
                                 "sqlite+pysqlite:///m.db"])
def test_tracking_uris_of_mlflows_stores_validate(uri):
    assert params_at(uri).tracking.uri == uri


@pytest.mark.parametrize("uri, path", [("sqlite:///mlflow.db", "mlflow.db"), ("sqlite+pysqlite:///runs/m.db", "runs/m.db"),
                                       ("sqlite:////abs/m.db", "/abs/m.db"), ("http://127.0.0.1:5000", None)])
def test_a_sqlite_store_is_locked_whatever_its_driver(uri, path):
    """Every sqlite form the params accept gets the file lock that keeps concurrent stages off each other's writes."""
    assert sqlite_file(uri) == path
    lock = _store_lock(uri)
    assert isinstance(lock, contextlib.nullcontext) if path is None else lock.lock_file == path + ".lock"


def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@contextlib.contextmanager
def http_server(status: int, body: bytes, content_type: str, delay: float = 0.0, headers: dict | None = None):
    """An HTTP server on 127.0.0.1 that answers every GET with `status`, `headers` and `body` after `delay` seconds:
    its URI."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


MLFLOW_404 = b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Could not find experiment"}'


def test_a_tracking_server_that_does_not_answer_fails_at_once_naming_the_setting(tmp_path, monkeypatch):
    """MLflow's client retries a closed port for minutes; the stage says in seconds which setting to fix."""
    no_proxy(monkeypatch)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"tracking.uri = 'http://127.0.0.1:{port}': no server answers"):
        with stage_run(params_at(f"http://127.0.0.1:{port}"), "train", "mha"):
            pytest.fail("the stage ran without its tracking server")
    assert time.monotonic() - start < 30


def test_a_tracking_server_that_answers_late_is_waited_for(monkeypatch):
    """A server busy while many stages start answers late: that is a server, within the answer timeout (the connect
    timeout, shorter here than the delay, does not bound the answer)."""
    no_proxy(monkeypatch)
    with http_server(404, MLFLOW_404, "application/json", delay=0.3) as uri:
        check_server(uri, connect_timeout=0.1, answer_timeout=5)


def test_a_tracking_server_that_never_answers_fails_naming_the_setting(monkeypatch):
    """One that takes the connection and never answers kept MLflow's client for about 15 minutes (a user's check)."""
    no_proxy(monkeypatch)
    with socket.socket() as server:  # listens, never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(ConnectionError, match=rf"tracking.uri = '{uri}': the server took the connection but sent no answer in 0.5 s"):
            check_server(uri, answer_timeout=0.5)


def test_a_tracking_uri_of_a_server_that_is_not_mlflows_fails_naming_the_setting(monkeypatch):
    """Another web service there (an HTML 404) gave MLflow's raw error with the page's HTML in it; another API's JSON
    is no MLflow answer either, and a proxy's 502 is named as such."""
    no_proxy(monkeypatch)
    for status, body, kind in ((404, b"<!DOCTYPE HTML><title>Not Found</title>", "text/html"),
                               (404, b'{"detail": "Not Found"}', "application/json")):
        with http_server(status, body, kind) as uri:
            with pytest.raises(ConnectionError, match=rf"tracking.uri = '{uri}': a server answers, but not MLflow's "
                                                      rf"\(GET /api/2.0/mlflow/experiments/get-by-name: HTTP 404, {kind}\); start one"):
                check_server(uri)
    with http_server(502, b"<html>Bad Gateway</html>", "text/html") as uri:
        with pytest.raises(ConnectionError, match=rf"tracking.uri = '{uri}': HTTP 502 from the server or a proxy before it"):
            check_server(uri)
    # Credentials, which MLflow's client sends (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_TOKEN) and the probe does not:
    # a 401, or a redirect to a login page, is left to the client.
    with http_server(401, b"login first", "text/plain") as uri:
        check_server(uri)
    with http_server(302, b"", "text/html") as uri:
        check_server(uri)


def test_a_tracking_servers_other_answers_are_taken_or_named(monkeypatch):
    """MLflow's 200 (the experiment exists) is a server's answer, and a 403 (credentials, as a 401) is left to MLflow's
    client; a 500 is named as the server's or a proxy's, and another service's 400 is no MLflow answer."""
    no_proxy(monkeypatch)
    with http_server(200, b'{"experiment": {"experiment_id": "1", "name": "attnbench"}}', "application/json") as uri:
        check_server(uri)
    with http_server(403, b"forbidden", "text/plain") as uri:
        check_server(uri)
    with (http_server(500, b"<html>Internal Server Error</html>", "text/html") as uri,
          pytest.raises(ConnectionError, match=rf"tracking.uri = '{uri}': HTTP 500 from the server or a proxy before it")):
        check_server(uri)
    with (http_server(400, b"<html>Bad Request</html>", "text/html") as uri,
          pytest.raises(ConnectionError, match=rf"tracking.uri = '{uri}': a server answers, but not MLflow's")):
        check_server(uri)


def test_a_redirect_to_a_login_page_is_left_to_mlflows_client(monkeypatch):
    """The probe does not follow a redirect: the login page it leads to (HTML, not MLflow's JSON) would fail a server
    that MLflow's client, with its credentials, gets through to."""
    no_proxy(monkeypatch)
    with (http_server(200, b"<html>Sign in</html>", "text/html") as login,
          http_server(302, b"", "text/html", headers={"Location": f"{login}/login"}) as uri):
        check_server(uri)


def test_a_store_lost_mid_run_costs_log_lines_not_the_stage(tmp_path, monkeypatch, caplog):
    """A server gone mid-run stalled training for minutes, then failed the stage (a user's check), and Snakemake
    deletes a failed job's outputs. Now a failed call warns (once for a run of failures), the run's calls are left
    out for a minute, then for twice as long while the store stays away, the run still ends FINISHED when the store
    is back, and the last line counts the loss."""
    from mlflow.tracking import MlflowClient as Client

    monkeypatch.chdir(tmp_path)
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    real_log_batch, calls = Client.log_batch, []

    def flaky_log_batch(self, run_id, metrics=(), **kwargs):
        calls.append([m.key for m in metrics])
        if any(m.key == "loss" for m in metrics):
            raise ConnectionError("server gone")
        return real_log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(Client, "log_batch", flaky_log_batch)
    with stage_run(params, "train", "mha") as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
        assert tracker.pause == 60
        tracker.log_metrics({"loss": 0.9}, step=2)  # within the minute: left out, not tried
        tracker.retry_at = 0.0  # the minute is over; the store is still away
        tracker.log_metrics({"loss": 0.8}, step=3)
        assert tracker.pause == 120
        tracker.retry_at = 0.0
        tracker.log_metrics({"val_bpb": 2.0}, step=4)  # back
        assert tracker.pause == 0
        tracker.log_metrics({"loss": 0.7}, step=5)  # away again: a new warning
    assert calls == [["loss"], ["loss"], ["val_bpb"], ["loss"]]
    client, [run] = runs(params.tracking.uri)
    assert run.info.status == "FINISHED" and run.data.metrics == {"val_bpb": 2.0}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3, warnings
    assert all("mlflow: metrics did not reach" in w and "(ConnectionError: ...server gone)" in w for w in warnings[:2]), warnings
    assert warnings[2].endswith("lacks 4 of its calls (params, metrics, artifacts or its status, FINISHED here); the stage's files have them")


@pytest.mark.parametrize("code", ["INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"])
def test_mlflows_errors_for_a_store_away_are_weathered(tmp_path, monkeypatch, code):
    """MLflow's client reports a connection it gave up on as INTERNAL_ERROR, a store overloaded or locked as
    TEMPORARILY_UNAVAILABLE or REQUEST_LIMIT_EXCEEDED: each costs the call and a pause, not the stage."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2
    from mlflow.tracking import MlflowClient as Client

    monkeypatch.chdir(tmp_path)
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    with stage_run(params, "train", "mha") as tracker:
        error = MlflowException("store away", error_code=getattr(databricks_pb2, code))
        monkeypatch.setattr(Client, "log_batch", lambda *args, **kwargs: (_ for _ in ()).throw(error))
        tracker.log_metrics({"loss": 1.0}, step=1)
        assert (tracker.lost, tracker.pause) == (1, 60)
    _, [run] = runs(params.tracking.uri)
    assert run.info.status == "FINISHED"


def test_the_pause_doubles_while_the_store_stays_away_up_to_16_minutes(tmp_path, monkeypatch):
    """1, 2, 4, 8, then 16 minutes, and no longer: a store away for hours is still tried every 16 minutes."""
    from mlflow.tracking import MlflowClient as Client

    monkeypatch.chdir(tmp_path)
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    pauses = []
    with stage_run(params, "train", "mha") as tracker:
        monkeypatch.setattr(Client, "log_batch", lambda *args, **kwargs: (_ for _ in ()).throw(ConnectionError("gone")))
        for step in range(7):
            tracker.retry_at = 0.0  # each pause over, the store still away
            tracker.log_metrics({"loss": 1.0}, step=step)
            pauses.append(tracker.pause)
    assert pauses == [60, 120, 240, 480, 960, 960, 960]


def test_a_call_the_store_refuses_is_raised_not_taken_for_an_outage(tmp_path, monkeypatch):
    """Only an unavailable store is weathered: a call's own fault (here a metric name MLflow refuses) is raised, and
    the run ends FAILED."""
    from mlflow.exceptions import MlflowException

    monkeypatch.chdir(tmp_path)
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(MlflowException), stage_run(params, "train", "mha") as tracker:
        tracker.log_metrics({"val bpb (end)!": 1.0}, step=1)
    with pytest.raises(FileNotFoundError), stage_run(params, "train", "la") as tracker:  # an OSError, but no outage
        tracker.log_artifact(tmp_path / "no-such-file.json")
    _, found = runs(params.tracking.uri)
    assert [r.info.status for r in found] == ["FAILED", "FAILED"]


def test_an_interrupted_stage_does_not_wait_on_a_store_that_is_away(tmp_path, monkeypatch, caplog):
    """A SIGTERM's grace is shorter than a call to a hung server: with the store away, the KILLED status is not tried
    (the run lacks it, and the last line says so); the bounded retries are the stage's only: user-set values win,
    and the defaults are gone after it."""
    from mlflow.tracking import MlflowClient as Client

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    seen = {}
    with pytest.raises(KeyboardInterrupt), stage_run(params, "train", "mha") as tracker:
        seen = {v: os.environ.get(v) for v in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
        monkeypatch.setattr(Client, "log_batch", lambda *args, **kwargs: (_ for _ in ()).throw(ConnectionError("gone")))
        monkeypatch.setattr(Client, "set_terminated", lambda *args, **kwargs: pytest.fail("waited on the store"))
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.retry_at = 0.0  # its minute is over, and the store has not answered since
        raise KeyboardInterrupt
    assert seen == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    assert caplog.records[-1].getMessage().endswith("lacks 2 of its calls (params, metrics, artifacts or its status, KILLED here); "
                                                    "the stage's files have them")


def test_an_interrupted_stage_with_its_store_there_ends_its_run_killed(tmp_path, monkeypatch):
    """Only a store that is away is spared the status call: with it there, an interrupted stage's run ends KILLED."""
    monkeypatch.chdir(tmp_path)
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(KeyboardInterrupt), stage_run(params, "train", "mha"):
        raise KeyboardInterrupt
    _, [run] = runs(params.tracking.uri)
    assert run.info.status == "KILLED"


def test_a_sigterm_inside_a_call_to_a_sqlite_store_arrives_after_it(tmp_path, monkeypatch):
    """A SIGTERM that stopped a call to the sqlite store inside its statement left the connection holding the
    database's lock: the KILLED status then waited 20 s for it and was lost (a flaky test_faults run, reproduced once
    in 60 SIGTERMs). The signal is held until the call returns: the call lands whole, then the stage stops, and its run
    ends KILLED."""
    from mlflow.tracking import MlflowClient as Client

    monkeypatch.chdir(tmp_path)
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    real_log_batch = Client.log_batch

    def log_batch_signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives here, inside the call
        return real_log_batch(self, *args, **kwargs)

    with pytest.raises(Terminated), sigterm_raises(), stage_run(params, "train", "mha") as tracker:
        monkeypatch.setattr(Client, "log_batch", log_batch_signalled)
        tracker.log_metrics({"loss": 1.0}, step=1)
        pytest.fail("the SIGTERM was not delivered when the call returned")
    _, [run] = runs(params.tracking.uri)
    assert run.info.status == "KILLED" and run.data.metrics == {"loss": 1.0}


def test_a_sigterm_while_waiting_for_the_stores_lock_is_not_held(tmp_path):
    """Signals are held only once the store's file lock is taken: a SIGTERM while another process holds the lock
    (its wait may last 600 s) stops the stage there, and the call never runs."""
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"lock = FileLock({sqlite_file(uri) + '.lock'!r}); lock.acquire(); print('held', flush=True); time.sleep(3)"],
                              stdout=subprocess.PIPE, text=True)
    ran, sigterm = [], threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))  # while this process waits
    try:
        assert holder.stdout.readline() == "held\n"
        sigterm.start()
        with pytest.raises(Terminated), sigterm_raises(), tracking._store_access(uri):
            ran.append(True)
    finally:
        sigterm.cancel()  # not sent, should the block end first: outside sigterm_raises it would end pytest
        holder.kill()
        holder.wait()
    assert ran == []


def test_a_sigterm_held_over_the_runs_creation_ends_that_run_killed(tmp_path, monkeypatch):
    """A SIGTERM that arrives while stage_run creates its run is held until the run exists, then stops the stage
    before its body: the new run ends KILLED, not RUNNING (found by review: the hold had made this so)."""
    from mlflow.tracking import MlflowClient as Client

    monkeypatch.chdir(tmp_path)
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    real_create_run = Client.create_run

    def create_run_signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_create_run(self, *args, **kwargs)

    monkeypatch.setattr(Client, "create_run", create_run_signalled)
    with pytest.raises(Terminated), sigterm_raises(), stage_run(params, "train", "mha"):
        pytest.fail("the stage's body ran")
    _, [run] = runs(params.tracking.uri)
    assert run.info.status == "KILLED"


def test_bounded_retries_bound_mlflows_client_where_the_user_has_not(monkeypatch):
    """Unset, MLflow's client retries a call 7 times, for over 4 minutes; inside a run 2 retries, a backoff factor of
    1 and 10-s timeouts (about 35 s against a hung server), and nothing left set after it."""
    from attnbench.tracking import RETRY_DEFAULTS, bounded_retries

    for variable in RETRY_DEFAULTS:
        monkeypatch.delenv(variable, raising=False)
    with bounded_retries():
        inside = {variable: os.environ.get(variable) for variable in RETRY_DEFAULTS}
    assert inside == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    assert not any(variable in os.environ for variable in RETRY_DEFAULTS)


def test_a_run_of_a_dvc_experiment_is_tagged_with_its_name_and_baseline(tmp_path, monkeypatch):
    """`dvc exp run` works in a temporary copy that it deletes: the tags say which experiment to `dvc exp apply`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "urban-sign")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abc")
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    with stage_run(params, "train", "mha"):
        pass
    _, [run] = runs(params.tracking.uri)
    assert {k: run.data.tags[k] for k in ("dvc_exp_name", "dvc_exp_baseline_rev")} == {"dvc_exp_name": "urban-sign", "dvc_exp_baseline_rev": "0123abc"}


def test_a_run_is_tagged_with_the_commit_of_the_code_it_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "git_tags", lambda: {"mlflow.source.git.commit": "0123abc", "package_modified": "false"})
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    with stage_run(params, "evaluate", "mha"):
        pass
    _, [run] = runs(params.tracking.uri)
    assert {k: run.data.tags[k] for k in ("mlflow.source.git.commit", "package_modified")} == {
        "mlflow.source.git.commit": "0123abc", "package_modified": "false"}


def test_git_tags_name_the_commit_and_whether_the_package_differs_from_it(tmp_path):
    """The package's own tracked files count: neither a changed file beside it in the tree nor an untracked one in
    it. No tags outside a Git tree, nor for a copy of the package in an ignored folder of one (an installed copy)."""
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    package, installed = tmp_path / "src" / "pkg", tmp_path / ".venv" / "site-packages" / "pkg"
    for folder in (package, installed):
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("x = 1\n")
    assert tracking.git_tags(package) == {}
    (tmp_path / ".gitignore").write_text(".venv/\n")
    (tmp_path / "dvc.lock").write_text("a\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "HEAD")
    (tmp_path / "dvc.lock").write_text("b\n")  # a stage's bookkeeping, not its code
    (package / "scratch.py").write_text("")  # untracked
    assert tracking.git_tags(package) == {"mlflow.source.git.commit": commit, "package_modified": "false"}
    assert tracking.git_tags(installed) == {}
    (package / "__init__.py").write_text("x = 2\n")
    assert tracking.git_tags(package) == {"mlflow.source.git.commit": commit, "package_modified": "true"}


def log_one(uri: str, index: int) -> None:
    with stage_run(params_at(uri), "train", f"v{index}") as tracker:
        for step in range(5):
            tracker.log_metrics({"loss": float(step)}, step=step)


def test_concurrent_stages_share_one_sqlite_store(tmp_path, monkeypatch):
    """Four stages at once (as snakemake --cores 4 runs them): no run lost, no 'database is locked'."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=log_one, args=(uri, i)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0] * 4
    client, found = runs(uri)
    assert sorted(r.info.run_name for r in found) == [f"train-v{i}" for i in range(4)]
    for r in found:
        assert r.info.status == "FINISHED"
        assert [m.value for m in client.get_metric_history(r.info.run_id, "loss")] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_import_runs_copies_history_and_status_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gpu, local = f"sqlite:///{tmp_path / 'gpu.db'}", f"sqlite:///{tmp_path / 'local.db'}"
    log_one(gpu, 0)
    with pytest.raises(RuntimeError), stage_run(params_at(gpu), "profile", "v1"):
        raise RuntimeError("out of time")
    assert import_runs(params_at(local), gpu) == 2
    assert import_runs(params_at(local), gpu) == 0, "a second import must add nothing"
    client, found = runs(local)
    by_name = {r.info.run_name: r for r in found}
    assert by_name["train-v0"].info.status == "FINISHED" and by_name["profile-v1"].info.status == "FAILED"
    assert by_name["train-v0"].data.tags["variant"] == "v0"
    assert [m.step for m in client.get_metric_history(by_name["train-v0"].info.run_id, "loss")] == [0, 1, 2, 3, 4]
    # A copy ends when its run ended there, not at the time of the import.
    _, sources = runs(gpu)
    assert {r.info.run_name: (r.info.start_time, r.info.end_time) for r in found} == {
        r.info.run_name: (r.info.start_time, r.info.end_time) for r in sources}
    # A mistyped sqlite path is named as missing: MLflow would create an empty store there and find no experiment.
    with pytest.raises(ValueError, match=r"--from sqlite:///typo/gpu.db: no such file 'typo/gpu.db'"):
        import_runs(params_at(local), "sqlite:///typo/gpu.db")
    assert not (tmp_path / "typo").exists()


def test_a_stage_logs_every_param_and_only_the_measured_metrics(tmp_path, monkeypatch):
    """A stage without a variant (report) is a run of the stage's name in a local store whose artifacts lie under
    ./mlartifacts; its params (MLflow takes 100 a call) are all there, none lost at a batch's edge; a metric that
    was not measured (None) is left out, not an error."""
    monkeypatch.chdir(tmp_path)
    params = params_at(f"sqlite:///{tmp_path / 'a.db'}")
    with stage_run(params, "report") as tracker:
        tracker.log_params({"group": {f"p{i:03d}": i for i in range(250)}})
        tracker.log_metrics({"bpb": 1.5, "mfu": None})
    client, [run] = runs(params.tracking.uri)
    assert run.info.run_name == "report" and run.data.tags["stage"] == "report" and "variant" not in run.data.tags
    assert run.data.params == {f"group.p{i:03d}": str(i) for i in range(250)}
    assert run.data.metrics == {"bpb": 1.5}
    assert client.get_experiment_by_name("attnbench/t").artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_an_experiment_another_stage_created_meanwhile_is_taken_not_an_error():
    """Against a server (no lock) two stages may both find no experiment and both create it: the one that loses the
    race takes the other's experiment; any other error of the store is still raised."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS

    class Store:
        def __init__(self, code):
            self.code, self.lookups = code, 0

        def get_experiment_by_name(self, name):
            self.lookups += 1
            return None if self.lookups == 1 else SimpleNamespace(experiment_id="7")

        def create_experiment(self, name, artifact_location=None):
            raise MlflowException("create failed", error_code=self.code)

    assert _experiment_id(Store(RESOURCE_ALREADY_EXISTS), "attnbench/t", "http://127.0.0.1:5000") == "7"
    with pytest.raises(MlflowException, match="create failed"):
        _experiment_id(Store(INVALID_PARAMETER_VALUE), "attnbench/t", "http://127.0.0.1:5000")

