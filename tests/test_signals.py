"""signals.sigterm_raises: SIGTERM as an exception inside, the previous handler back outside; signals.held: SIGINT
and SIGTERM held inside, delivered on leaving."""

from __future__ import annotations

import os
import signal

import pytest

from attnbench.signals import Terminated, held, sigterm_raises


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


def test_held_signals_arrive_on_leaving_once_each_to_the_handlers_set_before():
    """Inside, SIGTERM and SIGINT only arrive; on leaving, each that arrived is delivered once, in order, to the
    handler that was set before, which is back."""
    received = []

    def previous(signum, frame):
        received.append(signum)

    originals = {signum: signal.signal(signum, previous) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with held():
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), signum)
            assert received == []
        assert received == [signal.SIGTERM, signal.SIGINT]
        assert all(signal.getsignal(signum) is previous for signum in originals)
    finally:
        for signum, handler in originals.items():
            signal.signal(signum, handler)


def test_a_sigterm_held_over_a_call_raises_terminated_after_it():
    """Under sigterm_raises, a SIGTERM inside `held` lets the call finish, then raises Terminated."""
    finished = []
    with pytest.raises(Terminated):
        with sigterm_raises(), held():
            os.kill(os.getpid(), signal.SIGTERM)
            finished.append(True)
    assert finished == [True]
