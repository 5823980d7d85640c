"""Progress of a run, stage by stage: the hooks the pipeline calls, and one weighted fraction.

The pipeline reports three stages, in order: ``faces`` (pass 1, frames tracked), ``denoising``
(pass 2, frames synthesised and handed to the encoder) and ``encoding`` (frames the encoder has
finished, counted from the end of pass 2: the first update holds those it finished meanwhile).
A front door shows them its own way: the CLI draws a bar per stage, the web UI and the job
service one overall fraction (:func:`weighted_fraction`). :func:`stderr_bars` is the one layout
of rich progress bars that the CLI and the data and training tools draw.
"""

from __future__ import annotations

from collections.abc import Mapping

from rich import progress as rich_progress
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Share of one overall progress bar per stage (pass 2 is where the time goes).
STAGE_WEIGHTS = {"faces": 0.1, "denoising": 0.85, "encoding": 0.05}


def weighted_fraction(totals: Mapping[str, int], done: Mapping[str, int]) -> float:
    """Overall progress in [0, 1] from per-stage ``done`` / ``totals`` (stages started so far):
    :data:`STAGE_WEIGHTS` for the pipeline's stages; other stages (a runner with its own)
    share equally what is left."""
    total = 0.0
    for stage, weight in STAGE_WEIGHTS.items():
        if stage in totals:
            total += weight * min(1.0, done.get(stage, 0) / totals[stage])
    others = [s for s in totals if s not in STAGE_WEIGHTS]
    for stage in others:
        total += min(1.0, done.get(stage, 0) / totals[stage]) / len(others)
    return min(total, 1.0)


class Progress:
    """Progress sink: the CLI draws bars, the web UI a bar, the API nothing (this base class)."""

    def start(self, stage: str, total: int) -> None:  # noqa: B027 - optional hook
        pass

    def advance(self, stage: str, n: int = 1) -> None:  # noqa: B027
        pass

    def finish(self, stage: str) -> None:  # noqa: B027
        pass


class StageProgress(Progress):
    """Counts what is done of each stage; :meth:`fraction` is the weighted overall progress.
    Subclasses react in :meth:`changed` (called after every update)."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.stage = "starting"

    def start(self, stage: str, total: int) -> None:
        self.stage = stage
        self.totals[stage] = max(1, int(total))
        self.done[stage] = 0
        self.changed(stage)

    def advance(self, stage: str, n: int = 1) -> None:
        self.done[stage] = self.done.get(stage, 0) + n
        self.changed(stage)

    def finish(self, stage: str) -> None:
        self.done[stage] = self.totals.get(stage, 1)
        self.changed(stage)

    def fraction(self) -> float:
        return weighted_fraction(self.totals, self.done)

    def changed(self, stage: str) -> None:  # noqa: B027 - optional hook
        """Called after each update of ``stage``."""


def stderr_bars(
    field: str,
    *,
    label_width: int | None = None,
    percent: bool = False,
    enabled: bool = True,
    console: Console | None = None,
) -> rich_progress.Progress:
    """Rich progress bars: the task's description (right-aligned in ``label_width``), the bar,
    done/total, the percentage (``percent``), the task's ``field`` text, elapsed time and time
    left; on stderr unless ``console`` is given, drawn only when ``enabled``."""
    label = f"{{task.description:>{label_width}}}" if label_width else "{task.description}"
    columns: list[ProgressColumn] = [TextColumn(label), BarColumn(), MofNCompleteColumn()]
    if percent:
        columns.append(TaskProgressColumn())
    columns += [TextColumn(f"{{task.fields[{field}]}}"), TimeElapsedColumn(), TimeRemainingColumn()]
    return rich_progress.Progress(
        *columns, console=console or Console(stderr=True), disable=not enabled
    )
