"""Every error the API answers is JSON ``{"detail": "<one line>", "code": "<machine-readable>"}``
-- ours (:class:`ApiError`), FastAPI's validation errors, Starlette's own (unknown path,
wrong method), a database that cannot be reached (503), and bugs (500)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lipsync.errors import one_line
from lipsync.serving import metrics
from lipsync.serving.outage import OUTAGE_ERRORS

log = logging.getLogger("lipsync.serving.api")

MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
RETRY_AFTER_S = 5  # what a caller is told to wait when the database is away


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def error_response(status: int, code: str, detail: str, headers: dict | None = None):
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers that give every error its ``code``."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.status in (413, 415, 422, 429) and request.url.path == "/v1/jobs":
            metrics.JOBS_REJECTED.labels(reason=exc.code).inc()
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error_response(422, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    for kind in OUTAGE_ERRORS:
        app.add_exception_handler(kind, _unavailable)


async def _unavailable(request: Request, exc: Exception):
    log.warning("database unreachable: %s", one_line(exc))
    return error_response(
        503, "unavailable", "the service's database is unreachable; try again shortly",
        {"Retry-After": str(RETRY_AFTER_S)},
    )  # fmt: skip
