"""SIGTERM as an exception, so that what a timeout, Slurm's time limit or a cancelled job sends ends a stage as
Ctrl-C does."""

from __future__ import annotations

import contextlib
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
