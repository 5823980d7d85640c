"""A training progress bar on stderr (rich): steps done, rate, time left, the latest numbers."""

from __future__ import annotations

from lipsync.progress import stderr_bars


class TrainProgress:
    """``with TrainProgress(total, start, enabled) as bar: bar.update(step, loss=…)``."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, what: str = "train"):
        self._bar = stderr_bars("info", enabled=enabled)
        self._task = self._bar.add_task(what, total=total, completed=start, info="")

    def __enter__(self) -> TrainProgress:
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.stop()

    def update(self, step: int, **numbers: float) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in numbers.items())
        self._bar.update(self._task, completed=step, info=info)

    def log(self, message: str) -> None:
        self._bar.console.print(message, highlight=False)
