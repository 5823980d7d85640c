"""SIGTERM / SIGINT as a stop request for a training loop: the loop finishes its step, writes a
checkpoint and stops, instead of being killed mid-step."""

from __future__ import annotations

import signal
from typing import Any


class StopSignals:
    """While entered, SIGTERM and SIGINT set :attr:`received` (the signal number) instead of
    stopping the process. With ``second_interrupt=True`` a second Ctrl-C after the first request
    raises :class:`KeyboardInterrupt`. Off the main thread the handlers are left alone."""

    def __init__(self, *, second_interrupt: bool = False) -> None:
        self.second_interrupt = second_interrupt
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        """The received signal's name (``"SIGTERM"``), or None."""
        return None if self.received is None else signal.Signals(self.received).name

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.second_interrupt and self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
