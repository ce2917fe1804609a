"""SIGTERM as an exception, so that what a timeout, Slurm's time limit or a cancelled job sends ends a stage as
Ctrl-C does; both signals held over a call that must not stop halfway; and which process of a data-parallel stage
says that it ended so."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
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


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM held inside, for a call that must not stop halfway; on leaving, the handlers set before are
    back and each signal that arrived is delivered to its own, in order of arrival (where one raises, as the stages'
    do, the rest are dropped: the stage is stopping already). A call to MLflow's sqlite store stopped inside a statement
    left its connection holding the database's lock, so the run's final status waited 20 s for it and was lost (the
    run stayed RUNNING). Only the main thread sets handlers and receives signals; elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    try:
        # Each handler's restore is registered as soon as it is swapped, and an ExitStack runs every restore even if a
        # signal that arrives between two of them raises: no recording handler outlives the block.
        with contextlib.ExitStack() as restore:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(signum, lambda signum, frame: arrived.append(signum))
                restore.callback(signal.signal, signum, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
            yield
    finally:
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


# Set in the workers distributed.launch starts: their launcher, not they, reports the stage's end.
LAUNCHED = "ATTNBENCH_LAUNCHED"


def under_torchrun() -> bool:
    """True in a worker that torchrun started (it sets LOCAL_RANK, RANK, WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ


def reports_interruption() -> bool:
    """Whether this process says that the stage was interrupted: the launcher where attnbench started the workers,
    else rank 0 of a torchrun started by hand, not every worker."""
    return LAUNCHED not in os.environ and (not under_torchrun() or os.environ.get("RANK") == "0")
