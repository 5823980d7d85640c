"""``lipsync data …``: the command group (registered by :mod:`lipsync.cli`).

Heavy imports (torch, media, models) happen inside the commands, so ``lipsync --help`` and
argument errors stay fast.
"""

from __future__ import annotations

import typer

data_app = typer.Typer(
    no_args_is_help=True,
    help="Make training data: a synthetic corpus, or process real footage.",
)
