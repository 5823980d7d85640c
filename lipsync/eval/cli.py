"""``lipsync eval …``: the command group (registered by :mod:`lipsync.cli`).

Heavy imports (torch, media, models) happen inside the commands, so ``lipsync --help`` and
argument errors stay fast.
"""

from __future__ import annotations

import typer

eval_app = typer.Typer(
    no_args_is_help=True,
    help="Measure lip-sync quality: sync confidence, reconstruction metrics, benchmark suites.",
)
