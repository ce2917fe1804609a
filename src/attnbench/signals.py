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


def reports_the_end() -> bool:
    """Whether this process tells the user how the stage ended (an interruption): the launcher where attnbench
    started the workers, else rank 0 (a torchrun started by hand), not every worker."""
    return LAUNCHED not in os.environ and os.environ.get("RANK", "0") == "0"
