"""Running the ``lipsync`` command line: as a user does (a subprocess of this Python), or in this
process for paths that end before any heavy work (argument and input errors), where a new
interpreter's start-up (importing torch and MediaPipe: 2 s of CPU, 5-15 s on a loaded machine) is
all a subprocess would add. ``tests/cli/test_cli.py`` runs the real console entry point."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from lipsync.cli import main


def lipsync_cli(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lipsync.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, **kwargs,
    )  # fmt: skip


@dataclass
class CliResult:
    """What :func:`lipsync_main` saw: the exit code and the text written to stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


def lipsync_main(capsys: pytest.CaptureFixture[str], *args) -> CliResult:
    """``lipsync ARGS`` through :func:`lipsync.cli.main` in this process, its output captured by
    ``capsys``. Torch's thread count (which loading sets) is put back afterwards."""
    threads = torch.get_num_threads()
    capsys.readouterr()
    code: int = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return CliResult(code, out, err)
