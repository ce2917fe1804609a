"""Fault injection: what the stages do when killed, fed damaged files, diverging or out of memory.

25 faults injected in 12 tests (21 cases); kill -9 always hits a real `python -m attnbench` subprocess.

  fault (count)                                   expected outcome                              test
  kill -9 of train (3): after the checkpoint of   each re-run resumes from the last complete     1
    step 10, mid-write of a checkpoint, after     checkpoint; final model.pt, val_bpb_final,
    the checkpoint of step 25 (one folder)        curve equal to an uninterrupted run; no *.tmp
  SIGTERM of train after the checkpoint of        exit 143, one stderr line; MLflow run KILLED;  1b
    step 10 (1)                                   checkpoint kept; no model.pt, no *.tmp
  segfault inside a stage (1)                     stderr names it and the Python frames it hit   1c
  damaged checkpoint.pt (7): truncated, last      ignored with a warning, training starts from   2
    byte missing, empty, random bytes, zeroed     step 0 and ends equal to an uninterrupted run
    tail; zeroed block inside a tensor (caught
    by the zip's CRC-32), loadable non-checkpoint
  kill -9 of fetch mid-copy, of prepare           no corpus.bin / manifest.json; the re-run      3
    mid-write over an older split (2)             completes; no *.tmp
  temporaries of a dead and a live writer (1)     the next write removes the dead one's only     3b
  prepared split altered after prepare (1)        `train` exits 1, one stderr line on the        4
                                                  manifest checksum
  non-finite loss (1)                             the train stage's MLflow run ends FAILED       5
  out of GPU memory at the largest T (2)          rows `oom`, the rest run, exponents fit on     6
                                                  ok points only, the CSV holds the oom rows
  model.pt with pickled objects (2), of another   refused: UnpicklingError (weights only) /      7
    variant or seq_len (2), a checkpoint or bare  ValueError naming the difference / saying
    state_dict (2)                                it is not a save_model file

Outcomes: 25 handled as expected. Four were bugs this suite found: a checkpoint damaged inside a tensor
resumed silently from corrupted weights (torch.load does not check the CRC-32 stored in the zip;
load_checkpoint now runs testzip first), a loadable non-dict raised AttributeError instead of being
ignored, a SIGTERM ended a stage where it stood, leaving its MLflow run RUNNING (the CLI now raises it
as an interrupt), and a SIGTERM inside a statement of the sqlite store left the database locked, so the
KILLED status was lost (1b, once in CI; signals are now held over store calls, tests/test_tracking.py).

Covered elsewhere, not repeated: truncated or altered downloads and archives (tests/test_data.py), bad
params (tests/test_config.py), a checkpoint of another configuration and the in-process resume
(tests/test_train.py), concurrent MLflow writers (tests/test_tracking.py).

Subprocesses run with OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1 (the in-process reference run with
torch.set_num_threads(1)), so CPU results are bitwise equal across processes. Each subprocess spends
~7-9 s importing torch and mlflow, so the file runs 9 of them and does everything else in-process.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from attnbench import data, profile as profile_mod, train as train_mod
from attnbench.evaluate import evaluate
from attnbench.files import read_json, write_bytes, write_json
from attnbench.model import ByteLM, load_model, save_model
from attnbench.splits import SPLITS, load_split
from tests.tiny import write_params

KILL_TRAIN = {"train": {"steps": 40, "checkpoint_every": 5, "eval_every": 10, "log_every": 5}, "variants": {"mha": {}}}
ENV = {
    **{k: v for k, v in os.environ.items() if k != "ATTNBENCH_DEBUG"},
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
POLL = 0.0005  # seconds between looks at the files a stage writes


# ---------------------------------------------------------------- helpers


class Stage:
    """A `python -m attnbench <args>` subprocess in `cwd`, its stderr kept in `cwd/<name>.log`."""

    started: list[Stage] = []  # for the teardown of a failed test: none may outlive it

    def __init__(self, cwd: Path, name: str, *args: str, env: dict[str, str] = ENV):
        self.name, self.log = name, cwd / f"{name}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "attnbench", *args], cwd=cwd, env=env,
                                         stdout=subprocess.DEVNULL, stderr=err)
        Stage.started.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 240) -> int:
        return self.proc.wait(timeout)

    def finish(self) -> str:
        """Wait for a successful end; returns stderr."""
        assert self.wait() == 0, f"{self.name} failed:\n{self.stderr}"
        return self.stderr

    def wait_for(self, reached: Callable[[], bool], timeout: float = 240) -> None:
        """Return as soon as `reached()`; fails if the process ends on its own first."""
        deadline = time.monotonic() + timeout
        while not reached():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} ended (rc {self.proc.returncode}) before its kill point:\n{self.stderr}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"{self.name}: kill point not reached in {timeout} s")
            time.sleep(POLL)

    def kill_when(self, reached: Callable[[], bool], timeout: float = 240) -> None:
        """SIGKILL as soon as `reached()`; fails if the process ends on its own first."""
        self.wait_for(reached, timeout)
        self.sigkill()

    def sigkill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert self.wait() == -signal.SIGKILL, f"{self.name} ended on its own before the SIGKILL:\n{self.stderr}"


@pytest.fixture(autouse=True)
def no_stage_outlives_its_test():
    yield
    while Stage.started:
        stage = Stage.started.pop()
        if stage.proc.poll() is None:  # a test failed while its stage ran (it may be blocked on a FIFO)
            stage.proc.kill()
            stage.proc.wait()


def checkpoint_at_least(out: Path, step: int) -> Callable[[], bool]:
    """True once out/checkpoint.pt holds a step >= `step` (reloaded only when the file changes)."""
    path, seen = out / train_mod.CHECKPOINT, {}

    def reached() -> bool:
        try:
            st = path.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key not in seen:
                seen[key] = torch.load(path, weights_only=True)["step"]
            return seen[key] >= step
        except FileNotFoundError:
            return False

    return reached


def temporaries(root: Path, stem: str = "") -> list[Path]:
    """atomic_path's temporary files (`.<name>.<pid>.tmp`) under `root`, of names starting with `stem`."""
    return sorted(p for p in root.rglob("*.tmp") if p.name.startswith(f".{stem}"))


def writing(folder: Path, name: str) -> bool:
    """Whether a temporary file of `folder/name` exists (cheap enough to poll)."""
    try:
        return any(e.name.startswith(f".{name}.") and e.name.endswith(".tmp") for e in os.scandir(folder))
    except FileNotFoundError:
        return False


def kill_mid_write(stage: Stage, target: Path, min_bytes: int = 32768, timeout: float = 240) -> bytes:
    """SIGKILL `stage` while it writes `target` through files.atomic_path, after `min_bytes` of it.

    A tiny checkpoint is written in well under a millisecond, too fast to hit by polling, so the test
    puts a FIFO where atomic_path will open its temporary file (`.<name>.<pid>.tmp`, the pid being known
    as soon as the process starts): the writer blocks inside write() once the pipe is full, and is
    killed there. The FIFO is then replaced by a regular file holding the bytes the writer got out,
    which is what a kill in the middle of a real write leaves behind. Returns those bytes.
    """
    tmp = target.with_name(f".{target.name}.{stage.pid}.tmp")
    os.mkfifo(tmp)
    fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK)  # opened first, so the writer's open never blocks
    written = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while len(written) < min_bytes:
            if stage.proc.poll() is not None:
                raise AssertionError(f"{stage.name} ended (rc {stage.proc.returncode}) before writing {target.name}:\n{stage.stderr}")
            assert time.monotonic() < deadline, f"{stage.name} never wrote {target.name}"
            try:
                block = os.read(fd, 1 << 16)  # b"": no writer yet
            except BlockingIOError:  # the writer is there but has nothing in the pipe right now
                block = b""
            written += block
            if not block:
                time.sleep(POLL)
        stage.sigkill()  # blocked in write(): the rest of the file (>= 64 KiB more than the pipe holds) is not out
        while block := os.read(fd, 1 << 16):  # what the writer had put in the pipe before it died
            written += block
    finally:
        os.close(fd)
    tmp.unlink()
    tmp.write_bytes(bytes(written))
    return bytes(written)


def in_parallel(*jobs: Callable[[], object]) -> list:
    """Run independent subprocess chains two at a time (each spends most of its time importing)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return [f.result() for f in [pool.submit(job) for job in jobs]]


def resumed_from(step: int, log: str) -> bool:
    return re.search(rf"resuming mha from step {step}\b", log) is not None


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_training(out: Path, reference: Path) -> None:
    """`out` ended exactly as the uninterrupted `reference`: weights, final metrics and curve."""
    clean, got = weights(reference / "model.pt"), weights(out / "model.pt")
    assert clean.keys() == got.keys()
    for key in clean:
        assert torch.equal(clean[key], got[key]), f"{key} differs from the uninterrupted run"
    ref_summary, summary = read_json(reference / "train.json"), read_json(out / "train.json")
    assert summary["val_bpb_final"] == ref_summary["val_bpb_final"]
    assert summary["train_loss_final"] == ref_summary["train_loss_final"]

    def curve(folder):
        with open(folder / "curve.csv") as f:
            return [(r["step"], r["val_bpb"], r["train_loss"]) for r in csv.DictReader(f)]

    assert curve(out) == curve(reference)
    assert not (out / train_mod.CHECKPOINT).exists()
    assert temporaries(out) == [], "temporary files left behind"


@pytest.fixture(scope="session")
def mlflow_schema(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, made once: creating the tables costs each new store ~3 s."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(mlflow_schema, tmp_path) -> str:
    """tmp_path/mlflow.db (the default store of stages run in tmp_path), ready to use; returns its URI."""
    shutil.copyfile(mlflow_schema, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def prepared(tmp_path, monkeypatch, mlflow_store):
    """A tiny params file (40 steps, checkpoint every 5) and its prepared data; the working directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    path, params = write_params(tmp_path, KILL_TRAIN)
    data.fetch(params.data, tmp_path / "corpus.bin", tmp_path / "download")
    data.prepare(tmp_path / "corpus.bin", tmp_path / "prepared", params.data.max_bytes, params.data.splits)
    return path, params, tmp_path / "prepared"


# ---------------------------------------------------------------- 1. kill -9 of train


def test_train_killed_at_three_points_resumes_to_the_uninterrupted_result(prepared, tmp_path):
    """Fault: SIGKILL of a real `python -m attnbench train`, three times in a row on one output folder:
    (1) after the checkpoint of step 10, (2) the re-run in the middle of writing its first checkpoint,
    (3) the next re-run after the checkpoint of step 25.
    Expected: each re-run of the same command resumes from the last complete checkpoint (the torn write
    never replaced it); the final run's model.pt equals (torch.equal) an uninterrupted run's, as do
    val_bpb_final, train_loss_final and the curve; no checkpoint.pt and no *.tmp file remains."""
    _, params, data_dir = prepared
    out = tmp_path / "mha"
    command = ("train", "--params", "params.yaml", "--variant", "mha", "--data", str(data_dir), "--out", str(out))

    def step_kept() -> int:
        return torch.load(out / train_mod.CHECKPOINT, weights_only=True)["step"]

    first = Stage(tmp_path, "train1", *command)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): bitwise the same CPU results
    try:
        with ThreadPoolExecutor(1) as pool:  # the uninterrupted run, in this process while the stage imports
            reference = pool.submit(train_mod.train, params, "mha", data_dir, tmp_path / "reference")
            first.kill_when(checkpoint_at_least(out, 10))
            reference.result()
    finally:
        torch.set_num_threads(threads)
    kept = step_kept()
    assert 10 <= kept <= 20 and not (out / "model.pt").exists()

    second = Stage(tmp_path, "train2", *command)
    torn = kill_mid_write(second, out / train_mod.CHECKPOINT)
    assert torn.startswith(b"PK"), "not the start of a checkpoint (a zip)"
    assert resumed_from(kept, second.stderr)
    assert step_kept() == kept, "the torn write replaced the checkpoint"
    assert len(temporaries(out, "checkpoint.pt")) == 1 and not (out / "model.pt").exists()

    third = Stage(tmp_path, "train3", *command)
    third.kill_when(checkpoint_at_least(out, 25))
    assert resumed_from(kept, third.stderr)
    kept = step_kept()
    assert 25 <= kept < 40 and not (out / "model.pt").exists()

    log = Stage(tmp_path, "train4", *command).finish()
    assert resumed_from(kept, log)
    assert_same_training(out, tmp_path / "reference")


# ---------------------------------------------------------------- 1b. SIGTERM of train


def test_train_terminated_ends_its_mlflow_run_killed_and_keeps_its_checkpoint(prepared, tmp_path, mlflow_store):
    """Fault: SIGTERM (what `timeout`, Slurm's time limit and a cancelled job send) to a real
    `python -m attnbench train` after its checkpoint of step 10.
    Expected: exit status 143 with one stderr line saying it was interrupted, its MLflow run `train-mha` ended
    KILLED (before the CLI turned SIGTERM into an exception, the process died where it stood and the run stayed
    RUNNING), the checkpoint kept for a re-run, no model.pt and no temporary file."""
    out = tmp_path / "mha"
    stage = Stage(tmp_path, "train", "train", "--params", "params.yaml", "--variant", "mha", "--data", str(prepared[2]), "--out", str(out))
    stage.wait_for(checkpoint_at_least(out, 10))
    stage.proc.terminate()
    assert stage.wait() == 128 + signal.SIGTERM, stage.stderr
    assert stage.stderr.splitlines()[-1] == (
        "attnbench train: interrupted (SIGTERM); each output written is whole (train's checkpoint and fetch's partial download "
        "are kept to resume from)")
    assert "Traceback" not in stage.stderr

    client = MlflowClient(tracking_uri=mlflow_store)
    found = client.search_runs([client.get_experiment_by_name(prepared[1].experiment).experiment_id])
    assert [(r.info.run_name, r.info.status) for r in found] == [("train-mha", "KILLED")]
    assert torch.load(out / train_mod.CHECKPOINT, weights_only=True)["step"] >= 10
    assert not (out / "model.pt").exists() and temporaries(tmp_path) == []


def test_a_stage_that_crashes_in_native_code_prints_where(tmp_path):
    """Fault: a segfault inside a stage (CI once saw `train --variant la` end with exit status 139 and not a line of
    why). Expected: stderr names the fault and the Python frames it happened in (faulthandler)."""
    crash = ("import ctypes, runpy, sys; from attnbench import cli; cli.run = lambda args: ctypes.string_at(0); "
             "sys.argv = ['attnbench', 'fetch']; runpy.run_module('attnbench', run_name='__main__')")  # python -m attnbench fetch
    done = subprocess.run([sys.executable, "-c", crash], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGSEGV, done.stderr
    assert "Fatal Python error: Segmentation fault" in done.stderr and "<lambda>" in done.stderr, done.stderr


# ---------------------------------------------------------------- 2. torn or garbage checkpoint


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """Prepared tiny data, an uninterrupted run, and the real checkpoint (step 4) of a run interrupted at step 6."""
    root = tmp_path_factory.mktemp("resumable")
    _, params = write_params(root, {"data": {"path": str(root / "corpus.txt")}})
    data.fetch(params.data, root / "corpus.bin", root / "download")
    data.prepare(root / "corpus.bin", root / "prepared", params.data.max_bytes, params.data.splits)
    train_mod.train(params, "mha", root / "prepared", root / "clean")

    real_get_batch = train_mod.get_batch

    def get_batch(*args):
        if args[4] == 6:
            raise KeyboardInterrupt
        return real_get_batch(*args)

    train_mod.get_batch = get_batch
    try:
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(params, "mha", root / "prepared", root / "interrupted")
    finally:
        train_mod.get_batch = real_get_batch
    checkpoint = (root / "interrupted" / train_mod.CHECKPOINT).read_bytes()
    assert torch.load(io.BytesIO(checkpoint), weights_only=True)["step"] == 4
    return params, root, checkpoint


def zero_inside_largest_tensor(checkpoint: bytes) -> bytes:
    """256 zero bytes in the middle of the largest tensor record: the file's size and zip structure stay intact."""
    info = max(zipfile.ZipFile(io.BytesIO(checkpoint)).infolist(), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED
    header = checkpoint[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    middle = start + info.file_size // 2
    return checkpoint[:middle] + bytes(256) + checkpoint[middle + 256 :]


def not_a_checkpoint(_: bytes) -> bytes:
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)  # loads fine with weights_only=True, but is no checkpoint
    return buffer.getvalue()


DAMAGE = [
    pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
    pytest.param(lambda b: b[:-1], id="last-byte-missing"),
    pytest.param(lambda b: b"", id="empty"),
    pytest.param(lambda b: np.random.default_rng(0).integers(0, 256, len(b), dtype=np.uint8).tobytes(), id="random-bytes"),
    pytest.param(lambda b: b[:-4096] + bytes(4096), id="zeroed-tail"),  # a crash that left the last block unwritten
    pytest.param(zero_inside_largest_tensor, id="zeroed-inside-a-tensor"),  # torch.load alone would accept it
    pytest.param(not_a_checkpoint, id="loadable-non-checkpoint"),
]


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_ignored_and_training_starts_from_step_0(resumable, tmp_path, caplog, damage):
    """Fault: checkpoint.pt torn (truncated, missing its last byte, empty, last 4 KiB zeroed), replaced by
    random bytes, damaged inside a tensor, or a loadable object that is no checkpoint.
    Expected: train logs that it ignores the checkpoint, starts from step 0 (no 'resuming'), and ends
    exactly as the uninterrupted run."""
    params, root, checkpoint = resumable
    out = tmp_path / "mha"
    out.mkdir()
    (out / train_mod.CHECKPOINT).write_bytes(damage(checkpoint))
    with caplog.at_level(logging.INFO, logger="attnbench.train"):
        train_mod.train(params, "mha", root / "prepared", out)
    assert "starting from step 0" in caplog.text
    assert "resuming" not in caplog.text
    assert_same_training(out, root / "clean")


# ---------------------------------------------------------------- 3. kill -9 of fetch and prepare


def test_fetch_and_prepare_killed_mid_write_keep_no_final_output(tmp_path, monkeypatch, mlflow_store):
    """Fault: SIGKILL of `python -m attnbench fetch` while it copies a 30 MB local corpus (its temporary
    file half written), and of `prepare` while it writes train.bin, over a folder that already holds a
    complete split of other settings.
    Expected: no corpus.bin, and no manifest.json (the old one must not vouch for half-replaced splits);
    re-running each stage (in-process, to save two ~8 s subprocesses; test 1 re-runs the CLI after its
    kills) completes with the right bytes and leaves no *.tmp file behind."""
    monkeypatch.chdir(tmp_path)
    big = tmp_path / "big.txt"
    big.write_bytes(np.random.default_rng(0).integers(0, 256, 30 << 20, dtype=np.uint8).tobytes())
    _, params = write_params(tmp_path, {"data": {"path": str(big)}})
    fetched = tmp_path / "fetched" / "corpus.bin"
    corpus, split = tmp_path / "split" / "corpus.bin", tmp_path / "split" / "prepared"
    corpus.parent.mkdir()
    shutil.copyfile(big, corpus)
    data.prepare(corpus, split, 1_000_000, params.data.splits)  # an earlier, complete split (other max_bytes)

    def fetch_chain():
        command = ("fetch", "--params", "params.yaml", "--out", str(fetched))
        stage = Stage(tmp_path, "fetch1", *command)
        stage.kill_when(lambda: writing(fetched.parent, "corpus.bin"))
        assert temporaries(fetched.parent, "corpus.bin"), "killed after the copy ended, not during it"
        assert not fetched.exists()
        data.fetch(params.data, fetched, fetched.parent / "download")  # the re-run (the CLI path is test 1's)
        assert data.file_digest(fetched) == data.file_digest(big)
        assert temporaries(fetched.parent) == []

    def prepare_chain():
        command = ("prepare", "--params", "params.yaml", "--corpus", str(corpus), "--out", str(split))
        stage = Stage(tmp_path, "prepare1", *command)
        stage.kill_when(lambda: writing(split, "train.bin"))
        assert not (split / "manifest.json").exists(), "a manifest vouches for a split that was being rewritten"
        data.prepare(corpus, split, params.data.max_bytes, params.data.splits)  # the re-run
        manifest = read_json(split / "manifest.json")
        assert manifest["corpus_bytes_used"] == 30 << 20
        for name in SPLITS:
            load_split(split, name)  # size and sha256 match the manifest
        assert temporaries(split) == []

    in_parallel(fetch_chain, prepare_chain)


def test_next_write_removes_only_dead_writers_temporaries(tmp_path):
    """Fault: temporary files of out.bin left by a writer killed mid-write (its pid no longer runs), beside
    one of a live writer (this process's parent stands in for a concurrent writer) and one of another path.
    Expected: the next atomic write of out.bin removes the dead writer's file only."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.bin.{dead.pid}.tmp"
    live = tmp_path / f".out.bin.{os.getppid()}.tmp"
    other = tmp_path / f".other.bin.{dead.pid}.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    write_bytes(tmp_path / "out.bin", b"complete")
    assert (tmp_path / "out.bin").read_bytes() == b"complete"
    assert not stale.exists() and live.exists() and other.exists()


def test_next_write_keeps_temporaries_of_writers_it_may_not_signal_and_files_not_of_its_path(tmp_path, monkeypatch):
    """Fault: beside out.bin, the temporary file of a writer that os.kill may not signal (another user's process:
    PermissionError, so alive) and a `<pid>.tmp` file of no writer of out.bin, both of pids that do not run for us.
    Expected: the next atomic write of out.bin removes neither (only its own dead writers' files are its to delete)."""
    foreign_pid, unrelated_pid = 4_194_305, 4_194_306  # above any pid_max: no such process here
    real_kill = os.kill

    def kill(pid, sig):
        if pid == foreign_pid:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    foreign = tmp_path / f".out.bin.{foreign_pid}.tmp"
    unrelated = tmp_path / f"{unrelated_pid}.tmp"
    for path in (foreign, unrelated):
        path.write_bytes(b"partial")
    write_bytes(tmp_path / "out.bin", b"complete")
    assert foreign.exists() and unrelated.exists()


def test_an_atomic_write_is_synced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Fault: power loss just after the rename. Expected: the final name never points at data still only in the page
    cache, i.e. the temporary file is fsynced, holding all its bytes, while the final name does not exist yet."""
    target, synced = tmp_path / "out.bin", []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append((os.fstat(fd).st_size, target.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_bytes(target, b"complete")
    assert synced == [(8, False)]


def test_json_outputs_are_the_same_bytes_whatever_the_key_order(tmp_path):
    """DVC and snakemake compare outputs by content: equal dicts built in another order give the same file."""
    write_json(tmp_path / "a.json", {"b": 1, "a": {"d": 2, "c": 3}})
    write_json(tmp_path / "b.json", {"a": {"c": 3, "d": 2}, "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


# ---------------------------------------------------------------- 4. altered split


def test_train_on_an_altered_split_exits_nonzero_with_one_line(prepared, tmp_path):
    """Fault: one byte of prepared/train.bin flipped after prepare (size unchanged).
    Expected: `python -m attnbench train` exits 1; exactly one stderr line mentions the manifest checksum,
    and it is the `attnbench train: error:` line naming train.bin; no traceback, no model.pt, no checkpoint."""
    _, _, data_dir = prepared
    path = data_dir / "train.bin"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    out = tmp_path / "mha"
    stage = Stage(tmp_path, "train", "train", "--params", "params.yaml", "--variant", "mha", "--data", str(data_dir), "--out", str(out))
    assert stage.wait() == 1
    lines = [line for line in stage.stderr.splitlines() if "manifest checksum" in line]
    assert len(lines) == 1, stage.stderr
    assert lines[0].startswith("attnbench train: error: ") and "train.bin" in lines[0]
    assert "Traceback" not in stage.stderr
    assert not (out / "model.pt").exists() and not (out / train_mod.CHECKPOINT).exists()


# ---------------------------------------------------------------- 5. non-finite loss


def test_diverged_training_ends_its_mlflow_run_failed(tmp_path, monkeypatch, mlflow_store):
    """Fault: the weights turn NaN at step 5 (tests/test_train.py checks the exception and the kept checkpoint).
    Expected: attnbench.train.main raises TrainingDiverged and its MLflow run `train-mha` ends FAILED,
    holding the metrics logged before the divergence (steps 2 and 4) and no final metrics."""
    monkeypatch.chdir(tmp_path)
    uri = mlflow_store
    _, params = write_params(tmp_path, {"tracking": {"uri": uri}})
    data.fetch(params.data, tmp_path / "corpus.bin", tmp_path / "download")
    data.prepare(tmp_path / "corpus.bin", tmp_path / "prepared", params.data.max_bytes, params.data.splits)

    models, real_get_batch, real_make_optimizer = [], train_mod.get_batch, train_mod.make_optimizer

    def poisoned(*args):
        if args[4] == 5:
            with torch.no_grad():
                models[0].tok_emb.weight.fill_(float("nan"))
        return real_get_batch(*args)

    monkeypatch.setattr(train_mod, "make_optimizer", lambda model, *a: models.append(model) or real_make_optimizer(model, *a))
    monkeypatch.setattr(train_mod, "get_batch", poisoned)
    with pytest.raises(train_mod.TrainingDiverged, match="step 5"):
        train_mod.main(params, "mha", tmp_path / "prepared", tmp_path / "mha")

    client = MlflowClient(tracking_uri=uri)
    found = client.search_runs([client.get_experiment_by_name(params.experiment).experiment_id])
    assert [(r.info.run_name, r.info.status) for r in found] == [("train-mha", "FAILED")]
    run_id = found[0].info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [2, 4]
    assert [m.step for m in client.get_metric_history(run_id, "val_bpb")] == [4]
    assert "val_bpb_final" not in found[0].data.metrics


# ---------------------------------------------------------------- 6. out of GPU memory in profile


def test_profile_records_out_of_memory_points_and_fits_only_the_rest(tmp_path, monkeypatch, mlflow_store):
    """Fault: out of memory at the largest T: CUDA's torch.OutOfMemoryError inside the attention step (as a real OOM
    is, during the forward), and the CPU allocator's RuntimeError in the whole-model step builder.
    Expected: both points are rows with status `oom` and no measurements, every other point still runs
    (the whole-model scope after the attention OOM included), the exponents are fitted on the ok points
    only (memory exponents equal those of a clean profile of the smaller T), and profile.csv holds the
    oom rows; the MLflow run ends FINISHED."""
    monkeypatch.chdir(tmp_path)
    uri = mlflow_store
    seq_lens = [8, 16, 32, 64]
    _, params = write_params(tmp_path, {"profile": {"seq_lens": seq_lens, "tokens_per_step": 256}, "tracking": {"uri": uri}})
    largest = seq_lens[-1]
    real_attention_step, real_model_step = profile_mod.attention_step, profile_mod.model_step

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (injected by the test)")

    def attention_step(params_, variant, T, batch, device):
        step = real_attention_step(params_, variant, T, batch, device)
        return profile_mod.Step(oom) if T == largest else step

    def model_step(params_, variant, T, batch, device):
        if T == largest:  # as the CPU allocator fails: a RuntimeError, no class of its own
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                               "to allocate 1125899906842624 bytes (injected by the test)")
        return real_model_step(params_, variant, T, batch, device)

    monkeypatch.setattr(profile_mod, "attention_step", attention_step)
    monkeypatch.setattr(profile_mod, "model_step", model_step)
    summary = profile_mod.main(params, "mha", tmp_path / "mha")

    with open(tmp_path / "mha" / "profile.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scope"], int(r["T"]), r["status"]) for r in rows] == [  # the reference (mha's layer) was not made to fail
        (scope, T, "oom" if T == largest and scope != "reference" else "ok") for scope in ("attention", "reference", "model") for T in seq_lens
    ]
    for row in rows:
        measured = [row[k] for k in ("seconds", "tokens_per_s", "memory_bytes", "memory_method")]
        assert all(measured) if row["status"] == "ok" else not any(measured)
    assert read_json(tmp_path / "mha" / "profile.json") == summary
    for scope in ("attention", "model"):
        ok = [r for r in rows if r["scope"] == scope and r["status"] == "ok"]
        Ts = [int(r["T"]) for r in ok]
        assert summary[f"{scope}_time_exponent"] == profile_mod.fit_exponent(Ts, [float(r["seconds"]) / int(r["batch"]) for r in ok])
        assert summary[f"{scope}_memory_exponent"] == profile_mod.fit_exponent(Ts, [int(r["memory_bytes"]) / int(r["batch"]) for r in ok])

    monkeypatch.setattr(profile_mod, "attention_step", real_attention_step)
    monkeypatch.setattr(profile_mod, "model_step", real_model_step)
    _, smaller = write_params(tmp_path, {"profile": {"seq_lens": seq_lens[:-1], "tokens_per_step": 256}}, name="smaller.yaml")
    _, clean = profile_mod.profile(smaller, "mha")
    for scope in ("attention", "model"):
        assert summary[f"{scope}_memory_exponent"] == pytest.approx(clean[f"{scope}_memory_exponent"], rel=1e-12)

    client = MlflowClient(tracking_uri=uri)
    found = client.search_runs([client.get_experiment_by_name(params.experiment).experiment_id])
    assert [(r.info.run_name, r.info.status) for r in found] == [("profile-mha", "FINISHED")]


# ---------------------------------------------------------------- 7. model.pt loaded weights-only


class Payload:
    """An arbitrary class: unpickling an instance would run code outside torch's allow-list."""

    def __init__(self, note: str = "not a tensor"):
        self.note = note


class Gadget:
    """Unpickled, this would create `marker` (as a real exploit would run a command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def tiny_model(params, variant: str = "mha") -> ByteLM:
    torch.manual_seed(0)
    return ByteLM(params.model_for(variant))


@pytest.fixture
def tiny_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, params = write_params(tmp_path)
    return params


@pytest.mark.parametrize("kind", ["custom-class-instance", "code-running-reduce"])
def test_load_model_refuses_pickled_objects(tiny_params, tmp_path, kind):
    """Fault: model.pt holds, beside the weights, a pickled instance of a custom class, or an object whose
    unpickling would run code (create a marker file).
    Expected: load_model and evaluate refuse it with pickle.UnpicklingError (weights-only loading) and the
    code never runs."""
    model = tiny_model(tiny_params)
    marker = tmp_path / "pwned"
    extra = Payload() if kind == "custom-class-instance" else Gadget(marker)
    path = tmp_path / "mha" / "model.pt"
    path.parent.mkdir()
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict(), "extra": extra}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_model(path)
    with pytest.raises(pickle.UnpicklingError):
        evaluate(tiny_params, "mha", tmp_path / "nowhere", path)
    assert not marker.exists(), "unpickling ran code"


@pytest.mark.parametrize("saved, configured, key", [
    ({"variant": "mha"}, {"variant": "la"}, "variant"),
    ({"model": {"seq_len": 32}}, {"model": {"seq_len": 64}}, "seq_len"),
], ids=["other-variant", "other-seq_len"])
def test_evaluate_refuses_a_model_of_another_variant_or_seq_len(tmp_path, monkeypatch, saved, configured, key):
    """Fault: evaluate is pointed at a model.pt of another variant, or of another seq_len (d_model is
    tests/test_train.py's case).
    Expected: ValueError naming the path, the differing key and both values; nothing else is read."""
    monkeypatch.chdir(tmp_path)
    _, saved_params = write_params(tmp_path, saved.get("model") and {"model": saved["model"]}, name="saved.yaml")
    _, params = write_params(tmp_path, configured.get("model") and {"model": configured["model"]})
    path = tmp_path / "model.pt"
    save_model(tiny_model(saved_params, saved.get("variant", "mha")), path)
    variant = configured.get("variant", "mha")
    with pytest.raises(ValueError) as err:
        evaluate(params, variant, tmp_path / "nowhere", path)
    message = str(err.value)
    assert str(path) in message and "different model" in message
    was, now = (saved, configured) if key == "variant" else (saved["model"], configured["model"])
    assert f"'{key}': ({was[key]!r}, {now[key]!r})" in message, message


@pytest.mark.parametrize("kind", ["training-checkpoint", "bare-state-dict"])
def test_load_model_refuses_a_file_that_save_model_did_not_write(tiny_params, tmp_path, kind):
    """Fault: model.pt is a training checkpoint (checkpoint.pt copied over it) or a bare state_dict
    (torch.save(model.state_dict())): both load weights-only but hold no model config.
    Expected: ValueError naming the path and saying it is not a model written by save_model (not a bare
    KeyError: 'config', which the CLI would print as `error: 'config'`)."""
    model = tiny_model(tiny_params)
    path = tmp_path / "model.pt"
    if kind == "bare-state-dict":
        torch.save(model.state_dict(), path)
    else:
        optimizer = train_mod.make_optimizer(model, tiny_params.train, torch.device("cpu"))
        state = {"fingerprint": "x", "curve": [], "elapsed_s": 0.0, "rates": [], "first_rates": []}
        train_mod.save_checkpoint(path, model, optimizer, 4, state)
    with pytest.raises(ValueError, match="not a model written by save_model") as err:
        load_model(path)
    assert str(path) in str(err.value)
