"""Typed errors a user can act on.

Every error here reaches the CLI as one line (``error: <message>``) and a non-zero exit code,
and the job API as an HTTP 4xx. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


class LipSyncError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, wrong checkpoint)."""

    exit_code = 2


class ConfigError(LipSyncError):
    """An invalid model config, preset name or option value."""


class CheckpointError(LipSyncError):
    """A checkpoint file cannot be read or does not fit the model it is loaded into."""


class CheckpointNotFoundError(CheckpointError):
    """A checkpoint is not on disk (and could not be downloaded)."""


class MediaError(LipSyncError):
    """An input media file is unreadable, of the wrong kind, or out of bounds."""


class AudioError(MediaError):
    """An audio input is unreadable or unusable."""


class VideoError(MediaError):
    """A video input is unreadable, has no video stream, or is out of bounds (size, duration)."""


class NoFaceError(MediaError):
    """No usable face was found in the whole video."""


class OutputPathError(LipSyncError):
    """The output path is unusable: equal to an input, exists without --force, or unwritable."""


def one_line(exc: BaseException) -> str:
    """An exception as one short line for a user-facing message: FFmpeg's ``strerror`` (without
    errno and path) if present, else the message's first line, whitespace collapsed."""
    text = getattr(exc, "strerror", None) or str(exc)
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return " ".join(lines[0].split()) if lines else type(exc).__name__


def check_choice(what: str, value: T, choices: Iterable[T]) -> T:
    """``value`` if it is one of ``choices``, else a :class:`ConfigError` naming them all:
    ``unknown <what> 'x'; choose one of: a, b``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return value


def run_reporting_errors(command: Callable[[], object]) -> None:
    """Run a module's command-line entry point: a :class:`LipSyncError` becomes one
    ``error: …`` line on stderr and its exit code (anything else keeps its traceback)."""
    try:
        command()
    except LipSyncError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
