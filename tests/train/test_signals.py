"""StopSignals: SIGTERM / SIGINT become a stop request while entered; the old handlers return."""

from __future__ import annotations

import os
import signal

import pytest

from lipsync.train.signals import StopSignals


def test_sigterm_and_sigint_set_the_request_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        assert signals.received is None and signals.name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM and signals.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # no second-interrupt rule: just recorded
        assert signals.name == "SIGINT"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_second_ctrl_c_interrupts_when_asked():
    with StopSignals(second_interrupt=True) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with StopSignals(second_interrupt=True) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # only Ctrl-C escalates
        assert signals.name == "SIGTERM"
