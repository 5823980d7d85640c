"""Limits: how many bytes a request may send, and how many jobs a key may have.

:class:`BodyLimit` guards every request before the application reads its body: a
``Content-Length`` over the limit is refused at once (413); a body without one (``Transfer-
Encoding: chunked``) is counted as it streams and cut at the limit (413), so no more than the
limit is ever read, let alone written to disk. Any answer given before the body was read to the
end (a 401 for a bad key, a 413, a 429) closes the connection, so the server does not read and
throw away the rest. :func:`check_key_limits` applies a key's concurrency limit and quota (429).
"""

from __future__ import annotations

import json

import psycopg
from starlette.datastructures import Headers, MutableHeaders

from lipsync.serving import auth, db, metrics
from lipsync.serving.api.errors import ApiError
from lipsync.serving.inputs import too_large

FORM_OVERHEAD = 1024 * 1024  # multipart boundaries and small fields on top of the files


class BodyTooLarge(Exception):
    """The request body went past the limit while it was being read."""


class BodyLimit:
    """Pure ASGI middleware (see the module docstring); ``limit`` in bytes."""

    def __init__(self, app, limit: int, upload_limit: int):
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit  # named in the 413's message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, send)
            return
        state = {"read": 0, "complete": not (chunked or (length.isdigit() and int(length))),
                 "over": False, "started": False}  # fmt: skip

        async def counted() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                state["read"] += size
                metrics.BODY_BYTES.inc(size)
                if not message.get("more_body", False):
                    state["complete"] = True
                if state["read"] > self.limit:
                    state["over"] = True
                    raise BodyTooLarge
            return message

        async def closing(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                if not state["complete"]:  # do not read (and drop) the rest of the body
                    MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        try:
            await self.app(scope, counted, closing)
        except BodyTooLarge:
            if not state["started"]:
                await self._refuse(scope, send)

    async def _refuse(self, scope, send) -> None:
        if scope.get("path") == "/v1/jobs":
            metrics.JOBS_REJECTED.labels(reason="too_large").inc()
        err = too_large(self.upload_limit)
        body = json.dumps({"detail": err.message, "code": err.code}).encode()
        await send({
            "type": "http.response.start", "status": 413,
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()), (b"connection", b"close")],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def check_key_limits(conn: psycopg.Connection, key: auth.ApiKey, settings) -> None:
    """Refuse a new job (429) when the key has its limit of active jobs or used its quota."""
    limit = key.max_concurrency or settings.max_concurrency_per_key
    active = db.count_active(conn, key.id)
    if active >= limit:
        raise ApiError(
            429, "concurrency_limit",
            f"this key already has {active} queued or running jobs (limit {limit}); "
            "wait for one to finish",
            {"Retry-After": "10"},
        )  # fmt: skip
    quota = key.quota or settings.quota_per_key
    if quota is not None:
        used = db.count_recent(conn, key.id)
        if used >= quota:
            raise ApiError(
                429, "quota_exceeded",
                f"this key has used its quota of {quota} jobs per 24 hours",
                {"Retry-After": "3600"},
            )  # fmt: skip
