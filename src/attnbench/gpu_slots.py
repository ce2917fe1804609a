"""Which GPU(s) a stage runs on when several jobs share one machine.

Snakemake's `gpu` resource (`snakemake --resources gpu=N`) only caps how many GPUs the running
jobs ask for in total; it does not say which card each job gets. `gpu_slots(n)` does: it takes n
free slots, one lock file per visible GPU, and points CUDA_VISIBLE_DEVICES at them until the
stage ends. The locks are flock locks (the `filelock` library), so the kernel drops them when a
process dies, however it dies. When fewer than n slots are free the stage waits for them.

Nothing is done (no lock, CUDA_VISIBLE_DEVICES untouched):
  - without GPUs (and no ATTNBENCH_GPUS override),
  - under Slurm (SLURM_JOB_ID set): the job's GPU request already pinned its devices,
  - in a torchrun worker: the process that launched torchrun holds the slots of all workers.

ATTNBENCH_GPUS=N pretends N GPUs are visible (tests: "fake GPUs" on a CPU machine).
ATTNBENCH_GPU_SLOTS_DIR sets the lock folder (default: <tmp>/attnbench-gpu-slots-<uid>, one per
user and machine, so that separate workflows on the machine share it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .signals import under_torchrun

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


def slots_dir() -> Path:
    folder = os.environ.get("ATTNBENCH_GPU_SLOTS_DIR")
    return Path(folder) if folder else Path(tempfile.gettempdir()) / f"attnbench-gpu-slots-{os.getuid()}"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries ("0", "1", ... or the entries
    of an existing CUDA_VISIBLE_DEVICES); an empty list without GPUs."""
    fake = os.environ.get("ATTNBENCH_GPUS")
    if fake is not None:
        return [str(i) for i in range(int(fake))]
    import torch

    count = torch.cuda.device_count()  # NVML where present: does not initialise CUDA in this process
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is not None:
        return [d.strip() for d in mask.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


@contextlib.contextmanager
def gpu_slots(n: int = 1, folder: Path | None = None) -> Iterator[list[str] | None]:
    """Hold n of this machine's GPUs for the duration: CUDA_VISIBLE_DEVICES names them inside the
    block and is restored after it, and the slots are released even when the block raises.
    Yields the devices, or None where slots do not apply (see the module docstring) or n is 0."""
    if n == 0 or os.environ.get("SLURM_JOB_ID") or under_torchrun():
        yield None
        return
    devices = visible_gpus()
    if not devices:
        yield None
        return
    if n > len(devices):
        raise RuntimeError(f"this stage needs {n} GPUs but {len(devices)} are visible ({','.join(devices)})")
    folder = Path(folder or slots_dir())
    folder.mkdir(parents=True, exist_ok=True)
    held = _acquire(devices, n, folder)
    chosen = [device for device, _ in held]
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    slots = ",".join(str(devices.index(d)) for d in chosen)
    log.info("gpu slot(s) %s -> CUDA_VISIBLE_DEVICES=%s", slots, os.environ["CUDA_VISIBLE_DEVICES"])
    start = time.monotonic()
    try:
        yield chosen
    finally:
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous
        for _, lock in held:
            lock.release()
        log.info("gpu slot(s) %s released after %.1fs", slots, time.monotonic() - start)


def _acquire(devices: list[str], n: int, folder: Path) -> list[tuple[str, FileLock]]:
    """Lock n free slots, lowest first; when fewer are free, let go of all and try again shortly
    (holding some while waiting for more could deadlock two jobs that each need two)."""
    waiting = False
    while True:
        held = []
        for device in devices:
            lock = FileLock(folder / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', device)}.lock", timeout=0)
            try:
                lock.acquire()
            except Timeout:
                continue
            held.append((device, lock))
            if len(held) == n:
                return held
        for _, lock in held:
            lock.release()
        if not waiting:
            waiting = True
            log.info("waiting for %d free gpu slot(s) of %d (in %s)", n, len(devices), folder)
        time.sleep(POLL_SECONDS)
