"""The FastAPI app: routers, error handlers, the body limit and request metrics."""

from __future__ import annotations

import contextlib
import logging
import time

from fastapi import FastAPI

from lipsync import __version__
from lipsync.serving import metrics
from lipsync.serving.api import errors
from lipsync.serving.api.limits import FORM_OVERHEAD, BodyLimit
from lipsync.serving.api.routers import jobs, ops
from lipsync.serving.api.service import Service
from lipsync.serving.settings import ServeSettings

log = logging.getLogger("lipsync.serving.api")


def create_app(settings: ServeSettings | None = None, *, connect: bool = True) -> FastAPI:
    """The FastAPI app. ``connect=False`` builds it without a database (for the OpenAPI spec)."""
    settings = settings or ServeSettings.from_env()
    service = Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if connect:
            service.open()
            log.info("api ready", extra={"settings": settings.describe()})
        yield
        service.close()

    app = FastAPI(
        title="lipsync job API",
        version=__version__,
        description="Lip-sync jobs: upload a talking-head video and new audio, get the synced "
        "video back. See docs/SERVING.md.",
        lifespan=lifespan,
    )
    app.state.service = service
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(ops.router)
    limit = settings.max_upload_bytes + FORM_OVERHEAD
    app.add_middleware(BodyLimit, limit=limit, upload_limit=settings.max_upload_bytes)
    app.add_middleware(RequestMetrics)
    return app


class RequestMetrics:
    """Counts and times every request by method, route and status (pure ASGI middleware)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            path = getattr(scope.get("route"), "path", "other")
            method = scope["method"]
            metrics.HTTP_REQUESTS.labels(method, path, str(status[0])).inc()
            metrics.HTTP_SECONDS.labels(method, path).observe(time.perf_counter() - start)


def openapi_spec() -> dict:
    """The OpenAPI document (no database needed)."""
    return create_app(ServeSettings(), connect=False).openapi()


def run_api(settings: ServeSettings) -> None:
    import uvicorn

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=True,
        timeout_graceful_shutdown=30,
    )
