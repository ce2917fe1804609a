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
    """Inside, SIGTERM and SIGINT only arrive; on leaving, each that arrived is delivered once, in order of arrival, to
    the handler that was set before (here one that does not raise), which is back."""
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



def test_a_signal_between_two_restores_leaves_no_handler_of_held_behind(monkeypatch):
    """A signal that arrives once one handler is back raises there, inside the next restore: the other handler is
    restored all the same (before, held's recording handler stayed and swallowed every later SIGTERM)."""
    def previous(signum, frame):
        raise KeyboardInterrupt

    originals = {signum: signal.signal(signum, previous) for signum in (signal.SIGINT, signal.SIGTERM)}
    real_signal, first_back = signal.signal, []

    def restore_then_arrive(signum, handler):
        old = real_signal(signum, handler)
        if handler is previous and not first_back:  # the first handler back: its signal arrives now
            first_back.append(signum)
            os.kill(os.getpid(), signum)
        return old

    try:
        monkeypatch.setattr(signal, "signal", restore_then_arrive)
        with pytest.raises(KeyboardInterrupt):
            with held():
                pass
        monkeypatch.undo()
        assert first_back and all(signal.getsignal(signum) is previous for signum in originals)
    finally:
        monkeypatch.undo()
        for signum, handler in originals.items():
            signal.signal(signum, handler)
