"""Liveness, readiness and Prometheus metrics (no key needed)."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lipsync import __version__
from lipsync.errors import one_line
from lipsync.serving import db, metrics
from lipsync.serving.api.errors import error_response
from lipsync.serving.api.schemas import ErrorOut
from lipsync.serving.api.service import Svc

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict:
    return {"status": "ok", "version": __version__}


@router.get(
    "/readyz",
    summary="Readiness: database and storage reachable",
    responses={503: {"model": ErrorOut}},
)
def readyz(service: Svc):
    try:
        with service.pool.connection(timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        metrics.DATABASE_UP.set(0)
        return error_response(503, "not_ready", f"database unreachable: {one_line(exc)}")
    metrics.DATABASE_UP.set(1)
    try:
        service.storage.check()
    except Exception as exc:
        return error_response(503, "not_ready", f"storage unreachable: {one_line(exc)}")
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def prometheus_metrics(service: Svc):
    with contextlib.suppress(Exception):
        with service.pool.connection(timeout=3) as conn:
            metrics.set_status_counts(db.status_counts(conn))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
