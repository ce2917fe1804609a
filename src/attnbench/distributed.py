"""Data-parallel training: the torchrun launch, the process group, and each rank's share of a batch.

`train.nproc: N` (N > 1) makes `python -m attnbench train ...` run itself again as N
workers under torchrun (`python -m torch.distributed.run --standalone --nproc-per-node N`,
one machine). Every worker builds the same model from the same seed; torch's
DistributedDataParallel averages the gradients. A step's global batch is the one a single
process draws (grad_accum micro-batches of batch_size sequences, each fixed by
(seed, step, micro)); rank r takes its share r::N of it (see `shard`), so N processes end
with the weights of one process, up to float rounding. Rank 0 alone evaluates and writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .config import check_shardable
from .signals import LAUNCHED, Terminated, under_torchrun

log = logging.getLogger(__name__)

TIMEOUT = timedelta(minutes=60)  # the other ranks wait this long for rank 0's evaluation and checkpoint


def needs_launch(nproc: int) -> bool:
    return nproc > 1 and not under_torchrun()


def launch(nproc: int, argv: list[str], threads: int) -> None:
    """Run `python -m attnbench <argv>` as `nproc` workers on this machine with torchrun, in this process
    (`torch.distributed.run`, as `python -m torch.distributed.run --standalone --nproc-per-node=nproc
    -m attnbench <argv>` would); return when they are done, raise if one fails. The torchrun agent
    forwards SIGINT and SIGTERM to the workers. The workers split the job's `threads` CPU threads."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if not argv or argv[0] != "train":
        raise RuntimeError("train.nproc > 1 runs from the CLI (`python -m attnbench train ...`) or under torchrun")
    args = ["--standalone", f"--nproc-per-node={nproc}", "-m", "attnbench", *argv]
    log.info("launching %d data-parallel processes: torchrun %s", nproc, shlex.join(args))
    granted = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the job's: each worker takes its share (runtime.use_cpu_threads); torchrun's default is 1
    os.environ[LAUNCHED] = "1"
    try:
        torchrun(args)
    except SignalException as err:  # the agent's own handler took our SIGTERM or SIGINT and has stopped the workers
        raise (Terminated() if err.sigval == signal.SIGTERM else KeyboardInterrupt()) from None
    except ChildFailedError as err:
        failed = ", ".join(f"rank {rank} exit code {failure.exitcode}" for rank, failure in sorted(err.failures.items()))
        raise RuntimeError(f"{len(err.failures)} of {nproc} data-parallel processes failed ({failed}); their errors are above") from None
    finally:
        os.environ.pop(LAUNCHED, None)
        if granted is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = granted


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Under torchrun: join the workers' process group for the duration (nccl on CUDA, gloo on CPU),
    with each worker on GPU LOCAL_RANK and only rank 0 logging below warnings. Elsewhere: nothing."""
    if not under_torchrun():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=local_device(device))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    if rank() != 0:
        logging.getLogger("attnbench").setLevel(logging.WARNING)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_device(device: torch.device) -> torch.device:
    """This worker's device: cuda:LOCAL_RANK under torchrun, else `device` as it is."""
    if device.type == "cuda" and under_torchrun():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shard(grad_accum: int, batch_size: int, rank: int, world: int) -> list[tuple[int, slice]]:
    """This rank's share of a step's global batch, as (micro-batch, rows) pairs: whole micro-batches
    r::world when grad_accum divides evenly (each micro-batch then sees exactly what one process
    sees, auxiliary losses included), else rows r::world of every micro-batch (the cross-entropy
    gradient is still the one-process gradient; a batch-statistics auxiliary loss, lca's and sca's
    cluster balance, is then taken per share). Every rank gets the same number of sequences, so the
    mean of the ranks' mean losses is the global batch's mean."""
    check_shardable(world, grad_accum, batch_size)  # again: torchrun by hand may start another number than nproc
    if grad_accum % world == 0:
        return [(micro, slice(None)) for micro in range(rank, grad_accum, world)]
    return [(micro, slice(rank, None, world)) for micro in range(grad_accum)]


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel when there are several processes, else the model itself."""
    if world_size() == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_gradients(model: torch.nn.Module, sync: bool):
    """Context for one micro-step's forward and backward: DDP all-reduces the gradients only when
    `sync` (the last micro-step of an optimizer step); the others accumulate locally (no_sync)."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def mean_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def max_over_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
