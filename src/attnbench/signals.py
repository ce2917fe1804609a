"""SIGTERM as an exception, so that what a timeout, Slurm's time limit or a cancelled job sends ends a stage as
Ctrl-C does; and which process of a data-parallel stage says that it ended so."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the stage stands: it unwinds as on Ctrl-C, removing its temporary files and ending its
    MLflow run KILLED, where the default action would end the process on the spot and leave the run RUNNING."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside, SIGTERM raises Terminated (in the main thread, where Python runs signal handlers)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Set in the workers distributed.launch starts: their launcher, not they, reports the stage's end.
LAUNCHED = "ATTNBENCH_LAUNCHED"


def under_torchrun() -> bool:
    """True in a worker that torchrun started (it sets LOCAL_RANK, RANK, WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ


def reports_interruption() -> bool:
    """Whether this process says that the stage was interrupted: the launcher where attnbench started the workers,
    else rank 0 of a torchrun started by hand, not every worker."""
    return LAUNCHED not in os.environ and (not under_torchrun() or os.environ.get("RANK") == "0")
