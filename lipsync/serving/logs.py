"""Structured logs: one JSON object per line on stderr, with the job id when there is one.

>>> configure_logging("INFO")
>>> with job_context(job_id="…"):
...     log.info("started")     # {"ts": ..., "level": "INFO", "logger": ..., "msg": "started",
...                             #  "job_id": "…", ...}

Fields passed as ``extra=`` (procrastinate passes its own: ``action``, ``job``, ``worker``) are
included when they are JSON-serialisable.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator

_context: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "lipsync_log_context", default=None
)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


@contextlib.contextmanager
def job_context(**fields) -> Iterator[None]:
    """Add ``fields`` (e.g. ``job_id``) to every log line in this context."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_context.get() or {})
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_") or key in out:
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                value = repr(value)
            out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in (_context.get() or {}).items():
            if not hasattr(record, k):
                setattr(record, k, v)
        return True


def configure_logging(level: str = "INFO", as_json: bool = True) -> None:
    """Route all logging (ours, uvicorn's, procrastinate's) to stderr, JSON or plain."""
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(job_id)s] %(message)s")
        )
        handler.addFilter(_ContextFilter())
        handler.addFilter(_default_job_id)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("procrastinate").setLevel(max(logging.INFO, root.level))


def _default_job_id(record: logging.LogRecord) -> bool:
    if not hasattr(record, "job_id"):
        record.job_id = "-"
    return True
