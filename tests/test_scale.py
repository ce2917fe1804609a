"""Scaling out: DDP under torchrun, GPU slots under Snakemake, the Slurm profile, an MLflow server, a DVC remote.

All on CPU: DDP runs 2 gloo processes, and ATTNBENCH_GPUS=2 makes "fake GPUs" for the slots.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock, Timeout

from attnbench import data, distributed, gpu_slots as gpu_slots_mod, train as train_mod
from attnbench.config import ConfigError, load_params, parse_params
from attnbench.files import read_json
from attnbench.gpu_slots import gpu_slots, visible_gpus
from attnbench.runtime import use_cpu_threads
from tests.test_faults import Stage, no_stage_outlives_its_test  # noqa: F401 (autouse: no Stage outlives a failed test)
from tests.test_pipeline import ENV, job_counts, run, workspace
from tests.tiny import REPO, TINY, merge, write_params

# Slot tests get their own lock folder and fake GPUs; nothing inherited from the caller's machine.
CLEAN_ENV = {k: v for k, v in ENV.items() if k not in ("ATTNBENCH_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "LOCAL_RANK")}
FOUR_VARIANTS = {"mha": {}, "la": {}, "ca": {}, "cka": {}}


def run_env(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def prepare(folder: Path, params) -> Path:
    corpus, prepared = folder / "corpus.bin", folder / "prepared"
    data.fetch(params.data, corpus, folder / "download")
    data.prepare(corpus, prepared, params.data.max_bytes, params.data.splits)
    return prepared


# An MLflow server as the README starts it, on a free port. The tests that run stages log to it (one
# server start for the module, and no sqlite store to create per workspace), each to its own experiment.


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 in its own process group; yields its URL once /health answers
    (bounded wait) and stops the whole group at the end of the module."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "server.log", "w")
    server = subprocess.Popen(
        ["mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow-server.db'}",
         "--default-artifact-root", str(folder / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, env={**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (folder / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 120 s"
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def server_runs(url: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    return client, client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


# --- 1. data-parallel training --------------------------------------------------------------


@pytest.mark.parametrize("grad_accum, batch_size, world", [(4, 4, 2), (1, 4, 2), (3, 4, 2), (2, 6, 3)])
def test_rank_shares_cover_the_global_batch_once_and_average_to_its_gradient(grad_accum, batch_size, world):
    """What DDP computes (the mean over ranks of each rank's gradient) is the one-process gradient."""
    params = parse_params(merge(TINY, {"train": {"grad_accum": grad_accum, "batch_size": batch_size}}))
    shares = [distributed.shard(grad_accum, batch_size, r, world) for r in range(world)]
    rows = sorted((micro, row) for share in shares for micro, sl in share for row in range(batch_size)[sl])
    assert rows == [(m, b) for m in range(grad_accum) for b in range(batch_size)], "each sequence exactly once"
    assert len({sum(len(range(batch_size)[sl]) for _, sl in share) for share in shares}) == 1, "equal shares"

    data_ = (torch.arange(5000) % 251).numpy().astype("uint8")
    torch.manual_seed(0)
    model = train_mod.ByteLM(params.model_for("mha"))

    def gradient(pieces):
        model.zero_grad()
        for micro, sl in pieces:
            x, y = train_mod.get_batch(data_, 32, batch_size, 0, 7, micro, torch.device("cpu"))
            (model(x[sl], y[sl])[1] / len(pieces)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    one = gradient(distributed.shard(grad_accum, batch_size, 0, 1))
    averaged = torch.stack([gradient(share) for share in shares]).mean(0)
    assert torch.allclose(one, averaged, atol=1e-6)


def test_a_rank_gets_whole_micro_batches_when_grad_accum_divides_else_rows_of_each():
    """Whole micro-batches keep each one's batch statistics (lca's and sca's balance loss) as one process sees them;
    rows of every micro-batch only when grad_accum does not split evenly."""
    assert distributed.shard(4, 8, 0, 2) == [(0, slice(None)), (2, slice(None))]
    assert distributed.shard(4, 8, 1, 2) == [(1, slice(None)), (3, slice(None))]
    assert distributed.shard(3, 8, 1, 2) == [(0, slice(1, None, 2)), (1, slice(1, None, 2)), (2, slice(1, None, 2))]


def test_nproc_must_split_the_batch_evenly_and_does_not_change_the_checkpoint_fingerprint():
    with pytest.raises(ValueError, match="train.nproc = 2 must divide"):
        distributed.shard(3, 5, 0, 2)
    # The params file is refused at load, before any stage works (it failed in the train stage, after the data stages).
    with pytest.raises(ConfigError, match=r"train.nproc = 2 must divide train.grad_accum \(3\) or train.batch_size \(5\)"):
        parse_params(merge(TINY, {"train": {"nproc": 2, "grad_accum": 3, "batch_size": 5}}))
    manifest = {"splits": {"train": {"bytes": 1}}}
    one, two = parse_params(TINY), parse_params(merge(TINY, {"train": {"nproc": 2}}))
    assert train_mod.fingerprint(one, "mha", manifest) == train_mod.fingerprint(two, "mha", manifest)


def test_only_train_nproc_above_one_outside_torchrun_launches_workers(monkeypatch):
    """nproc 1 trains in this process; nproc 2 relaunches under torchrun, but not from inside a torchrun worker."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert (distributed.needs_launch(1), distributed.needs_launch(2)) == (False, True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not distributed.needs_launch(2)


def test_launch_gives_torchrun_the_jobs_threads_and_then_restores_the_callers(monkeypatch):
    """The workers split the job's CPU threads (OMP_NUM_THREADS for the launch only): after it the caller's grant is
    back, or absent again when there was none."""
    import torch.distributed.run

    seen = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda args: seen.append((args, os.environ["OMP_NUM_THREADS"], os.environ.get("ATTNBENCH_LAUNCHED"))))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    distributed.launch(2, ["train", "--variant", "mha"], 8)
    assert seen == [(["--standalone", "--nproc-per-node=2", "-m", "attnbench", "train", "--variant", "mha"], "8", "1")]
    assert os.environ["OMP_NUM_THREADS"] == "3" and "ATTNBENCH_LAUNCHED" not in os.environ
    monkeypatch.delenv("OMP_NUM_THREADS")
    distributed.launch(2, ["train"], 8)
    assert "OMP_NUM_THREADS" not in os.environ


def test_the_launcher_checks_the_tracking_server_before_starting_workers(tmp_path, monkeypatch):
    """A closed port stops train.nproc 2 in one line before torchrun, not in every worker after they start (a
    user's check: five lines of gloo's and torchrun's)."""
    from tests.test_tracking import no_proxy

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    no_proxy(monkeypatch)
    monkeypatch.setattr(distributed, "launch", lambda *args: pytest.fail("workers started"))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, params = write_params(tmp_path, {"train": {"nproc": 2, "grad_accum": 2, "device": "cpu"},
                                        "tracking": {"uri": f"http://127.0.0.1:{port}"}})
    with pytest.raises(ConnectionError, match=rf"tracking.uri = 'http://127.0.0.1:{port}': no server answers"):
        train_mod.main(params, "mha", tmp_path / "prepared", tmp_path / "mha", argv=["train"])


def test_launch_refuses_a_stage_other_than_train(monkeypatch):
    """Only the train stage has data-parallel workers: another stage's command line is refused, not run under torchrun."""
    import torch.distributed.run

    monkeypatch.setattr(torch.distributed.run, "main", lambda args: pytest.fail(f"torchrun {args}"))
    for argv in (["evaluate", "--variant", "mha"], []):
        with pytest.raises(RuntimeError, match="train.nproc > 1 runs from the CLI"):
            distributed.launch(2, argv, 4)


COLLECTIVES = """
import json, sys, torch, torch.distributed as dist
from attnbench import distributed
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
mean = distributed.mean_over_ranks_(torch.tensor([rank + 1.0, 4.0 * rank])).tolist()
top = distributed.max_over_ranks_(torch.tensor([float(rank), -float(rank)])).tolist()
distributed.barrier()
print(json.dumps([distributed.rank(), distributed.world_size(), mean, top]))
dist.destroy_process_group()
"""


def test_two_gloo_ranks_average_and_take_the_max_of_a_tensor(tmp_path):
    """The logged loss of a data-parallel step is the mean of the ranks' losses (not their sum), and a failure flag
    raised on one rank (max) is seen by all."""
    env = {**CLEAN_ENV, "GLOO_SOCKET_IFNAME": "lo"}
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [subprocess.Popen([sys.executable, "-c", COLLECTIVES, str(r), init], env=env, stdout=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        got = [json.loads(p.communicate(timeout=60)[0]) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert got == [[r, 2, [1.5, 2.0], [1.0, 0.0]] for r in range(2)]


def test_two_gloo_processes_under_torchrun_train_the_weights_of_one_and_log_one_run_to_an_mlflow_server(
    tmp_path, monkeypatch, mlflow_server
):
    monkeypatch.chdir(tmp_path)
    # grad_accum 4 over 2 processes: 2 micro-batches each (no_sync, then the all-reduce); lca: Gumbel noise + aux loss.
    train = {"steps": 6, "batch_size": 4, "grad_accum": 4, "eval_every": 3, "checkpoint_every": 3, "log_every": 3, "device": "cpu"}
    tracking = {"uri": mlflow_server, "experiment": "scale/ddp"}
    _, one = write_params(tmp_path, {"train": train, "variants": {"lca": {}}}, name="one.yaml")
    write_params(tmp_path, {"train": {**train, "nproc": 2}, "tracking": tracking, "variants": {"lca": {}}})
    prepared = prepare(tmp_path, one)
    train_mod.train(one, "lca", prepared, tmp_path / "one")

    # The stage command as the front ends run it: with train.nproc 2 it re-runs itself under torchrun.
    env = {**CLEAN_ENV, "ATTNBENCH_GPU_SLOTS_DIR": str(tmp_path / "slots")}
    log = run_env([sys.executable, "-m", "attnbench", "train", "--params", "params.yaml", "--variant", "lca",
                   "--data", "prepared", "--out", "two"], tmp_path, env)
    assert "launching 2 data-parallel processes" in log and "cpu x 2 processes" in log
    assert log.count("step 6/6  val") == 1, "only rank 0 logs"

    clean = torch.load(tmp_path / "one" / "model.pt", weights_only=True)["state_dict"]
    ddp = torch.load(tmp_path / "two" / "model.pt", weights_only=True)["state_dict"]
    for key in clean:
        assert torch.allclose(clean[key], ddp[key], atol=1e-6), f"{key} differs: {(clean[key] - ddp[key]).abs().max()}"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["curve.csv", "model.pt", "train.json"]
    assert (tmp_path / "two" / "curve.csv").read_text().count("\n") == 3, "header + the evaluations at steps 3 and 6, once"
    assert read_json(tmp_path / "two" / "train.json")["nproc"] == 2

    # The server (tracking.uri) has exactly one run from the 2 processes, with its metrics and artifacts.
    client, runs = server_runs(mlflow_server, "scale/ddp")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("train-lca", "FINISHED")]
    assert runs[0].data.params["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_bpb")] == [3, 6]
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"train.json", "curve.csv"}
    assert not (tmp_path / "mlflow.db").exists(), "logged to the local store instead"


def test_sigterm_to_a_torchrun_train_stage_ends_it_as_one_process_ends(tmp_path, monkeypatch):
    """SIGTERM (what Slurm sends at a job's time limit) to a train stage whose train.nproc 2 runs torchrun in-process:
    torchrun's agent takes the signal with its own handler and stops the workers; the stage then exits 143 with the
    line a one-process stage prints, where it reported the agent's SignalException as an error (exit 1). The
    workers' own ends are not asserted: a worker blocked in a collective may be killed by the agent instead."""
    monkeypatch.chdir(tmp_path)
    train = {"steps": 400, "batch_size": 4, "grad_accum": 2, "eval_every": 5, "checkpoint_every": 5, "log_every": 5,
             "device": "cpu", "nproc": 2}
    _, params = write_params(tmp_path, {"train": train})
    prepare(tmp_path, params)
    env = {**CLEAN_ENV, "ATTNBENCH_GPU_SLOTS_DIR": str(tmp_path / "slots")}
    stage = Stage(tmp_path, "train", "train", "--params", "params.yaml", "--variant", "mha", "--data", "prepared", "--out", "two", env=env)
    stage.wait_for(lambda: (tmp_path / "two" / train_mod.CHECKPOINT).exists())  # the workers are training
    stage.proc.terminate()
    assert stage.wait(120) == 128 + signal.SIGTERM, stage.stderr
    assert stage.stderr.splitlines()[-1] == (
        "attnbench train: interrupted (SIGTERM); each output written is whole (train's checkpoint and fetch's partial download "
        "are kept to resume from)")
    assert stage.stderr.count("interrupted (SIGTERM)") == 1, "the launcher says it, not each worker too"
    assert (tmp_path / "two" / train_mod.CHECKPOINT).exists() and not (tmp_path / "two" / "model.pt").exists()


def test_the_launcher_or_else_rank_0_alone_reports_an_interruption(monkeypatch):
    """Ctrl-C under train.nproc 2 printed the interrupted line three times: the launcher's and each worker's. Now the
    launcher's (its workers carry ATTNBENCH_LAUNCHED), or under a torchrun started by hand rank 0's."""
    from attnbench.signals import LAUNCHED, reports_interruption

    for name in (LAUNCHED, "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert reports_interruption()  # one process, or the launcher
    monkeypatch.setenv("RANK", "3")
    assert reports_interruption()  # a RANK without torchrun (a cluster launcher's, one process per pod)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert reports_interruption()  # rank 0 of a hand-started torchrun
    monkeypatch.setenv("RANK", "1")
    assert not reports_interruption()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(LAUNCHED, "1")
    assert not reports_interruption()  # rank 0 of attnbench's own launch: its launcher reports


# --- 2. GPU slots ---------------------------------------------------------------------------


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ATTNBENCH_GPUS", "2")
    monkeypatch.setenv("ATTNBENCH_GPU_SLOTS_DIR", str(tmp_path / "slots"))
    return {**CLEAN_ENV, "ATTNBENCH_GPUS": "2", "ATTNBENCH_GPU_SLOTS_DIR": str(tmp_path / "slots")}


def test_gpu_slots_take_free_devices_wait_for_them_and_are_freed_when_a_holder_dies(fake_gpus):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom attnbench.gpu_slots import gpu_slots\nwith gpu_slots(1) as d:\n"
                               "    print(*d, flush=True)\n    sys.stdin.read()"],
        env=fake_gpus, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().split() == ["0"]
        with gpu_slots(1) as devices:
            assert devices == ["1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        assert "CUDA_VISIBLE_DEVICES" not in os.environ, "restored on exit"

        got = []
        waiter = threading.Thread(target=lambda: got.extend(_hold(2)))
        waiter.start()
        time.sleep(1.0)
        assert not got, "took 2 slots while another process held one"
        holder.kill()  # no clean-up in the holder: the kernel drops its lock
        waiter.join(timeout=10)
        assert got == ["0", "1"]
    finally:
        holder.kill()
        holder.wait()

    with pytest.raises(KeyError), gpu_slots(2):
        raise KeyError("the stage failed")
    assert _hold(2) == ["0", "1"], "released after a failure"
    with pytest.raises(RuntimeError, match="needs 3 GPUs but 2 are visible"), gpu_slots(3):
        pass


def _hold(n):
    with gpu_slots(n) as devices:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(devices)
        return devices


def test_gpu_slots_restore_the_callers_cuda_visible_devices(fake_gpus, monkeypatch):
    """A mask set before the stage (a shell's, a launcher's) is the caller's again after it, not removed."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with gpu_slots(1) as devices:
        assert devices == ["0"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "3"


def test_gpu_slots_stand_aside_without_gpus_under_slurm_and_in_torchrun_workers(fake_gpus, monkeypatch):
    for name, value in [("ATTNBENCH_GPUS", "0"), ("SLURM_JOB_ID", "42"), ("LOCAL_RANK", "1")]:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with gpu_slots(1) as devices:
                assert devices is None and "CUDA_VISIBLE_DEVICES" not in os.environ, name


def _free(folder: Path, device: str) -> bool:
    """Whether another job could take slot `device` now."""
    lock = FileLock(folder / f"gpu-{device}.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return False
    lock.release()
    return True


def test_gpu_slots_are_released_by_the_end_of_the_block_not_by_garbage_collection(fake_gpus, monkeypatch):
    """A block that fails releases its slots itself: a lock object still referenced elsewhere (a traceback's frame,
    a debugger, another Python than CPython) would otherwise keep its GPU from other jobs for as long."""
    made = []

    class KeptLock(FileLock):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)  # a reference that outlives the block

    monkeypatch.setattr(gpu_slots_mod, "FileLock", KeptLock)
    with pytest.raises(KeyError), gpu_slots(2):
        assert [lock.is_locked for lock in made] == [True, True]
        raise KeyError("the stage failed")
    assert [lock.is_locked for lock in made] == [False, False]


def test_a_stage_waiting_for_slots_holds_none_of_them_meanwhile(fake_gpus, tmp_path):
    """Waiting for 2 slots while another job holds slot 0, a stage does not sit on slot 1 between its tries: two jobs
    that each held one slot and waited for the other would deadlock."""
    folder = tmp_path / "slots"
    folder.mkdir()
    other = FileLock(folder / "gpu-0.lock", timeout=0)
    other.acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.extend(_hold(2)))
    waiter.start()
    try:
        time.sleep(0.2)
        free = []
        for _ in range(3):  # the waiter holds slot 1 for an instant of each try, the probe can miss one
            free.append(_free(folder, "1"))
            time.sleep(0.1)
        assert any(free), "slot 1 held while waiting for slot 0"
    finally:
        other.release()
        waiter.join(timeout=10)
    assert got == ["0", "1"]


def test_gpu_slots_of_zero_gpus_take_no_slot(fake_gpus, monkeypatch):
    """A stage that needs no GPU (train.device cpu) neither takes nor waits for a slot, and leaves the mask alone."""
    monkeypatch.setattr(gpu_slots_mod, "_acquire", lambda *args: pytest.fail("took a slot for n = 0"))
    with gpu_slots(0) as devices:
        assert devices is None and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_gpu_slot_locks_lie_in_the_folder_attnbench_gpu_slots_dir_names(fake_gpus, tmp_path):
    """The lock folder is the configured one (separate workflows of one machine share it; tests get their own)."""
    with gpu_slots(1) as devices:
        assert devices == ["0"] and [p.name for p in (tmp_path / "slots").iterdir()] == ["gpu-0.lock"]


def test_visible_gpus_are_the_callers_mask_cut_to_the_gpus_torch_counts(monkeypatch):
    """With a CUDA_VISIBLE_DEVICES mask the slots are its entries, no more than the GPUs there are (a mask may name
    more); without one, the devices 0..count-1."""
    monkeypatch.delenv("ATTNBENCH_GPUS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,7")
    assert visible_gpus() == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]


# --- 3. Snakemake: gpu resources, the Slurm profile, a run on fake GPUs ----------------------


def job_field(dry_run: str, field: str) -> dict[str, set[str]]:
    """rule -> the set of its jobs' `field:` lines in a dry run ("" for a job without one)."""
    out: dict[str, set[str]] = {}
    for block in re.split(r"^(?:local)?rule ", dry_run, flags=re.M)[1:]:
        found = re.search(rf"^\s+{field}: (.*)$", block, re.M)
        out.setdefault(block.split(":")[0], set()).add(found.group(1) if found else "")
    return out


def test_snakemake_plans_train_with_nproc_gpus_under_the_slurm_profile(tmp_path):
    """One dry run: the plan of a 4-variant config with train.nproc 2 on 2 GPUs, with the Slurm profile's
    resources (the profile minus `executor: slurm`: the plugin is not installed here)."""
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm" and "slurm_partition" in profile["default-resources"]
    ws = workspace(tmp_path, {"train": {"nproc": 2}, "variants": FOUR_VARIANTS})
    (ws / "local-profile").mkdir()
    (ws / "local-profile" / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in profile.items() if k != "executor"}))

    plan = run([sys.executable, "-m", "snakemake", "-n", "--cores", "all", "--resources", "gpu=2", "--profile", "local-profile"], ws)
    assert job_counts(plan) == {"fetch": 1, "prepare": 1, "sources": 4, "train": 4, "evaluate": 4, "profile": 4, "report": 1, "all": 1}
    resources = {rule: [set(r.split(", ")) for r in lines] for rule, lines in job_field(plan, "resources").items()}
    for r in resources["train"]:
        assert {"gpu=2", "tasks_per_gpu=0", "cpus_per_gpu=8", "runtime=720", "slurm_partition=YOUR_PARTITION"} <= r, r
    for r in resources["evaluate"] + resources["profile"]:
        assert {"gpu=1", "tasks_per_gpu=0"} <= r, r
    assert not any(i.startswith("gres=") for lines in resources.values() for r in lines for i in r), "gres with gpu: the plugin refuses"
    # The benchmark target compiles every variant: more than the default's one CPU and 8 GB (a user's check).
    plan = run([sys.executable, "-m", "snakemake", "-n", "benchmark", "--cores", "all", "--resources", "gpu=2", "--profile", "local-profile"], ws)
    [benchmark] = job_field(plan, "resources")["benchmark"]
    assert {"gpu=1", "tasks_per_gpu=0", "cpus_per_gpu=8", "mem_mb=32000", "runtime=60"} <= set(benchmark.split(", ")), benchmark


@pytest.mark.parametrize("gpus, cores, threads, device, expected", [
    (None, 2, "auto", "auto", 2),  # CPU jobs one at a time with every core, as dvc repro runs them
    ("2", 8, "auto", "auto", 4),   # a share per GPU: two jobs side by side
    ("2", 8, 3, "auto", 3),
    ("2", 8, "auto", "cpu", 8),    # training on the CPU of a GPU host: one at a time, and no GPU asked for
])
def test_snakemake_gives_train_evaluate_and_profile_jobs_their_cpu_threads(tmp_path, gpus, cores, threads, device, expected):
    ws = workspace(tmp_path, {"train": {"threads": threads, "device": device}})
    env = CLEAN_ENV | ({"ATTNBENCH_GPUS": gpus} if gpus else {})
    plan = run_env([sys.executable, "-m", "snakemake", "-n", "--forceall", "--cores", str(cores)], ws, env)
    declared = {rule: counts for rule, counts in job_field(plan, "threads").items() if counts != {""}}
    assert declared == {"train": {str(expected)}, "evaluate": {str(expected)}, "profile": {str(expected)}}
    asked = {rule: {item for line in lines for item in line.split(", ") if item.startswith("gpu=")}
             for rule, lines in job_field(plan, "resources").items() if rule in declared}
    assert asked == {rule: {"gpu=0" if device == "cpu" else "gpu=1"} for rule in declared}, asked


@pytest.mark.parametrize("setting, granted, workers, expected", [
    ("auto", "1", None, 1),     # Snakemake's grant
    (2, "1", None, 2),          # a number wins over the grant
    ("auto", None, None, None),  # dvc repro: no grant, every core of the affinity
    ("auto", "0", None, None),   # OMP_NUM_THREADS=0 grants nothing: every core of the affinity, not 0 (nor 1)
    (4, None, "2", 2),          # torchrun's workers split the job's threads
])
def test_a_stage_takes_train_threads_or_the_grant_or_its_cores(monkeypatch, setting, granted, workers, expected):
    for name, value in (("OMP_NUM_THREADS", granted), ("LOCAL_WORLD_SIZE", workers)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    try:
        assert use_cpu_threads(setting) == torch.get_num_threads() == (expected or len(os.sched_getaffinity(0)))
    finally:
        torch.set_num_threads(before)


def test_the_profile_stage_computes_on_the_threads_snakemake_grants(tmp_path):
    """Snakemake hands a job its threads as OMP_NUM_THREADS (dvc repro hands none): the stage takes them with
    train.threads auto, and records them."""
    write_params(tmp_path, {"profile": {"seq_lens": [8, 16], "whole_model": False, "warmup": 0, "repeats": 1}})
    run_env([sys.executable, "-m", "attnbench", "profile", "--params", "params.yaml", "--variant", "mha", "--out", "out"],
            tmp_path, CLEAN_ENV | {"OMP_NUM_THREADS": "1"})
    assert read_json(tmp_path / "out" / "profile.json")["cpu_threads"] == 1


SLOT_LINE = re.compile(r"^(\d\d:\d\d:\d\d) attnbench train: gpu slot\(s\) (\d+) -> CUDA_VISIBLE_DEVICES=(\d+)$", re.M)
FREE_LINE = re.compile(r"^(\d\d:\d\d:\d\d) attnbench train: gpu slot\(s\) (\d+) released", re.M)


def test_snakemake_on_two_fake_gpus_runs_two_trainings_at_a_time_on_distinct_devices(tmp_path, monkeypatch, fake_gpus, mlflow_server):
    train = {"steps": 4, "eval_every": 4, "checkpoint_every": 4, "log_every": 2, "eval_batches": 1}
    tracking = {"uri": mlflow_server, "experiment": "scale/fake-gpus"}
    ws = workspace(tmp_path, {"train": train, "tracking": tracking, "variants": FOUR_VARIANTS})
    monkeypatch.chdir(ws)
    prepare(ws / "results/tiny/data", load_params("params.yaml"))  # in place, so that only the trainings run
    # Created up front: two stages starting at once against a server would both create it, and one
    # fails (tracking._experiment_id guards only sqlite stores against that).
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=mlflow_server).create_experiment("scale/fake-gpus")
    targets = [f"results/tiny/variants/{v}/model.pt" for v in FOUR_VARIANTS]
    out = run_env([sys.executable, "-m", "snakemake", *targets, "--cores", "4", "--resources", "gpu=2"], ws, fake_gpus)
    assert job_counts(out) == {"sources": 4, "train": 4}, out

    jobs = []
    for variant in FOUR_VARIANTS:
        log = (ws / "logs" / "tiny" / f"train-{variant}.log").read_text()
        taken, freed = SLOT_LINE.search(log), FREE_LINE.search(log)
        assert taken and freed, f"train-{variant}.log names no gpu slot:\n{log}"
        assert taken.group(2) == freed.group(2) and taken.group(3) in ("0", "1")
        start, end = (datetime.strptime(m.group(1), "%H:%M:%S") for m in (taken, freed))
        jobs.append((start, end, taken.group(3), variant))
    # Logged to the second: two intervals that overlap here truly overlapped (the converse may miss some).
    overlapping = [(a, b) for i, a in enumerate(jobs) for b in jobs[i + 1 :] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, f"no two trainings ran at once: {jobs}"
    for a, b in overlapping:
        assert a[2] != b[2], f"{a[3]} and {b[3]} ran at once on device {a[2]}"
    # Intervals that overlap pairwise share a moment: three of them would be three trainings at once.
    assert not any({(a, b), (a, c), (b, c)} <= set(overlapping) for a, b, c in itertools.combinations(jobs, 3)), jobs


# --- 4. a DVC remote ------------------------------------------------------------------------


def test_dvc_push_then_pull_restores_the_prepared_data(tmp_path, monkeypatch):
    """The data is prepared in place and recorded as the fetch and prepare stages' outputs with `dvc commit`
    (what `dvc repro prepare` records, without two stage processes; test_pipeline's slow test runs dvc repro)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    workspace(ws)
    monkeypatch.chdir(ws)
    results = ws / "results" / "tiny" / "data"
    prepare(results, load_params("params.yaml"))
    shutil.rmtree(results / "download", ignore_errors=True)
    run(["dvc", "init", "--no-scm", "-q"], ws)
    run(["dvc", "commit", "--force", "fetch", "prepare"], ws)
    before = {p.relative_to(results): p.read_bytes() for p in results.rglob("*") if p.is_file()}
    assert {str(p) for p in before} == {"corpus.bin", "prepared/train.bin", "prepared/val.bin", "prepared/test.bin", "prepared/manifest.json"}

    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "remote")], ws)
    assert "5 files pushed" in run(["dvc", "push", "fetch", "prepare"], ws)
    shutil.rmtree(ws / "results")
    shutil.rmtree(ws / ".dvc" / "cache")  # as on another machine: only the remote has the data
    run(["dvc", "pull", "fetch", "prepare"], ws)
    assert {p.relative_to(results): p.read_bytes() for p in results.rglob("*") if p.is_file()} == before
    assert "up to date" in run(["dvc", "status", "prepare"], ws)


def test_dvc_experiment_queue_runs_a_sweep_two_at_a_time(tmp_path):
    """`dvc exp run --queue` + `dvc queue start -j 2`: two settings of data.max_bytes run as queued
    experiments on two workers; both succeed, each with its own setting and its own prepared split."""
    ws = workspace(tmp_path)
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    run(["git", "init", "-q"], ws)
    run(["dvc", "init", "-q"], ws)
    run(["git", "add", "-A"], ws)
    run([*git, "commit", "-qm", "workspace"], ws)
    for max_bytes in (30000, 40000):  # the prepare target only: a sweep of the data stage, seconds each
        run(["dvc", "exp", "run", "--queue", "-S", f"data.max_bytes={max_bytes}", "prepare"], ws)
    # The workers are daemons that would inherit (and hold open) pipes until they exit: log to a file instead,
    # so the test waits on the queue's status with its own deadline, not on a worker's shutdown.
    with open(tmp_path / "queue-start.log", "w") as log:
        subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=ws, env=ENV, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=60)
    try:
        deadline = time.monotonic() + 240
        while re.search(r"Queued|Running", status := run(["dvc", "queue", "status"], ws)) and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=ws, env=ENV, capture_output=True, timeout=60)
    assert len(re.findall(r"Success$", status, re.M)) == 2, status
    manifests = {}
    for baseline in json.loads(run(["dvc", "exp", "show", "--json"], ws)):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                max_bytes = rev["data"]["params"]["params.yaml"]["data"]["data"]["max_bytes"]
                manifests[max_bytes] = rev["data"]["outs"]["results/tiny/data/prepared/manifest.json"]["hash"]
    assert set(manifests) == {30000, 40000}, manifests
    assert len(set(manifests.values())) == 2, "both experiments produced the same split"
