"""Running the ``lipsync`` command line as a user does: a subprocess of this Python."""

from __future__ import annotations

import subprocess
import sys


def lipsync_cli(*args, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lipsync.cli", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, **kwargs,
    )  # fmt: skip
