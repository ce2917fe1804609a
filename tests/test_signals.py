"""signals.sigterm_raises: SIGTERM as an exception inside, the previous handler back outside."""

from __future__ import annotations

import os
import signal

import pytest

from attnbench.signals import Terminated, sigterm_raises


def test_sigterm_raises_inside_and_the_previous_handler_is_restored():
    """Inside the context SIGTERM raises Terminated; on leaving it, by an exception too, the handler that was set
    before is back (the handler of a test runner, or of the code that called the stage in-process)."""
    received = []

    def previous(signum, frame):
        received.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(Terminated):
            with sigterm_raises():
                assert signal.getsignal(signal.SIGTERM) is not previous
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is previous
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, original)
