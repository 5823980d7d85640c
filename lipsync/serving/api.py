"""``lipsync serve api``: the HTTP job API (FastAPI). docs/SERVING.md has curl examples.

=======================================  =====================================================
``POST /v1/jobs``                        submit: multipart ``video`` (+ ``audio``) uploads or
                                         ``video_url`` / ``audio_url`` (``s3://``); options
                                         ``steps``, ``guidance``, ``seed``, ``min_face_size``,
                                         ``loop_video``, ``crf``; ``Idempotency-Key`` header
``GET /v1/jobs``                         the caller's jobs, newest first
``GET /v1/jobs/{id}``                    status, progress, attempts, error, report
``GET /v1/jobs/{id}/result``             the synced video (streamed)
``DELETE /v1/jobs/{id}``                 cancel (queued: at once; running: between chunks)
``GET /healthz`` ``/readyz`` ``/metrics``  liveness, readiness (database + storage), Prometheus
=======================================  =====================================================

Authentication: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (401 without a valid
one). A key sees only its own jobs (another key's job is a 404). Errors are JSON
``{"detail": "<one line>", "code": "<machine-readable>"}``.

Inputs are checked before anything is queued: content type (415), size (413), probe / decode /
duration (422, 413 over the duration limit), and a face in a few frames (422). Uploads are
written to storage before the job row is committed, and the row and its queue entry are
committed together: an accepted job is never lost, and a refused one leaves nothing queued.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from lipsync import __version__
from lipsync.errors import ConfigError, one_line
from lipsync.serving import auth, db, metrics, queue
from lipsync.serving.inputs import (
    InputRejected,
    Staged,
    check_inputs,
    stage_upload,
    stage_url,
    too_large,
)
from lipsync.serving.logs import job_context
from lipsync.serving.settings import ServeSettings
from lipsync.serving.storage import open_storage

log = logging.getLogger("lipsync.serving.api")

FORM_OVERHEAD = 1024 * 1024  # multipart boundaries and small fields on top of the files
MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class ErrorOut(BaseModel):
    detail: str = Field(description="What went wrong, in one line.")
    code: str = Field(description="Machine-readable error code.")


class JobError(BaseModel):
    kind: str | None = Field(None, description="Error class (NoFaceError, oom, worker_lost, …).")
    message: str


class JobOut(BaseModel):
    id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled.")
    progress: float = Field(description="0 … 1.")
    stage: str | None = None
    attempts: int = Field(description="Attempts started so far.")
    failures: int = Field(description="Attempts that failed (errors, lost workers).")
    max_attempts: int
    options: dict[str, Any]
    error: JobError | None = Field(None, description="Why it failed (or the last retry's cause).")
    cancel_requested: bool
    result_url: str | None = Field(None, description="Where to download the result.")
    report: dict[str, Any] | None = Field(None, description="The run report once succeeded.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    retry_at: datetime | None = Field(None, description="Next attempt, while waiting to retry.")
    history: list[dict[str, Any]] = Field(default_factory=list, description="Attempt events.")


class JobList(BaseModel):
    jobs: list[JobOut]
    next_before: datetime | None = Field(None, description="Pass as ?before= for the next page.")


def job_out(row: dict) -> JobOut:
    error = None
    if row.get("error"):
        error = JobError(kind=row.get("error_kind"), message=row["error"])
    jid = str(row["id"])
    return JobOut(
        id=jid,
        status=row["status"],
        progress=float(row["progress"] or 0.0),
        stage=row.get("stage"),
        attempts=row["attempts"],
        failures=row["failures"],
        max_attempts=row["max_attempts"],
        options=row["options"] or {},
        error=error,
        cancel_requested=row["cancel_requested"],
        result_url=f"/v1/jobs/{jid}/result" if row["status"] == "succeeded" else None,
        report=row.get("report"),
        created_at=row["created_at"],
        started_at=row.get("started_at"),
        finished_at=row.get("finished_at"),
        retry_at=row.get("retry_at"),
        history=db.as_json(row.get("history") or []),
    )


def build_options(settings: ServeSettings, given: dict[str, Any]) -> dict[str, Any]:
    """The job's RunOptions: what the caller may set (steps, guidance, seed, min_face_size,
    loop_video, crf, mode), checked, plus the service's chunk size."""
    from dataclasses import fields

    from lipsync.pipeline import RunOptions

    options = {k: v for k, v in given.items() if v is not None}
    known = {f.name for f in fields(RunOptions)}
    for name in options:
        if name not in known:
            raise ApiError(422, "bad_option", f"option {name!r} is not supported by this build")
    if options.get("steps", 1) > settings.max_steps:
        raise ApiError(422, "bad_option", f"steps must be at most {settings.max_steps}")
    try:
        RunOptions(**options).validate()
    except (ConfigError, TypeError, ValueError) as exc:
        raise ApiError(422, "bad_option", one_line(exc)) from None
    if "crf" in options and not 0 <= options["crf"] <= 51:
        raise ApiError(422, "bad_option", f"crf must be 0..51, got {options['crf']}")
    options["chunk_frames"] = settings.chunk_frames
    return options


def current_key(
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
    x_api_key: Annotated[str | None, Header(description="The API key")] = None,
) -> auth.ApiKey:
    """The caller's API key (401 without a valid one)."""
    presented = auth.key_from_headers(authorization, x_api_key)
    if not presented:
        raise ApiError(401, "unauthorized", MISSING_KEY, {"WWW-Authenticate": "Bearer"})
    with request.app.state.service.pool.connection() as conn:
        key = auth.lookup(conn, presented)
    if key is None:
        raise ApiError(
            401, "unauthorized", "invalid or revoked API key", {"WWW-Authenticate": "Bearer"}
        )
    return key


Key = Annotated[auth.ApiKey, Depends(current_key)]


class Service:
    """What the endpoints share: settings, database pool, storage, queue app."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.pool = None
        self.storage = None
        self.queue_app = None

    def open(self) -> None:
        url = self.settings.require_database()
        deadline = time.monotonic() + 30
        while True:
            try:
                db.migrate(url)
                break
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ConfigError(f"cannot reach the database: {one_line(exc)}") from None
                log.warning("database not reachable yet: %s", one_line(exc))
                time.sleep(1)
        self.pool = db.make_pool(url, max_size=16, name="api")
        self.storage = open_storage(self.settings)
        self.queue_app = queue.make_app(self.settings)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


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

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.status in (413, 415, 422, 429) and request.url.path == "/v1/jobs":
            metrics.JOBS_REJECTED.labels(reason=exc.code).inc()
        return JSONResponse(
            {"detail": exc.detail, "code": exc.code}, status_code=exc.status, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse(
            {"detail": f"{where}: {first.get('msg')}", "code": "invalid_request"}, status_code=422
        )

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if (
            request.method == "POST"
            and length
            and length.isdigit()
            and int(length) > settings.max_upload_bytes + FORM_OVERHEAD
        ):
            metrics.JOBS_REJECTED.labels(reason="too_large").inc()
            err = too_large(settings.max_upload_bytes)
            response: Response = JSONResponse(
                {"detail": err.message, "code": err.code}, status_code=413,
                headers={"Connection": "close"},
            )  # fmt: skip
        elif request.url.path.startswith("/v1/") and not (
            request.headers.get("authorization") or request.headers.get("x-api-key")
        ):  # refuse before reading (and spooling) an anonymous upload
            response = JSONResponse(
                {"detail": MISSING_KEY, "code": "unauthorized"}, status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "other")
        metrics.HTTP_REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        metrics.HTTP_SECONDS.labels(request.method, path).observe(time.perf_counter() - start)
        return response

    errors = {
        401: {"model": ErrorOut, "description": "Missing or invalid API key"},
        404: {"model": ErrorOut, "description": "No such job (for this key)"},
    }

    def check_limits(conn: psycopg.Connection, key: auth.ApiKey) -> None:
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

    @app.post(
        "/v1/jobs",
        status_code=201,
        response_model=JobOut,
        summary="Submit a lip-sync job",
        responses={
            **errors,
            200: {"model": JobOut, "description": "Idempotent replay: the job already created"},
            403: {"model": ErrorOut, "description": "Input bucket not allowed"},
            413: {"model": ErrorOut, "description": "Upload too large or too long"},
            415: {"model": ErrorOut, "description": "Wrong content type"},
            422: {"model": ErrorOut, "description": "Bad input (unreadable, no face, options)"},
            429: {"model": ErrorOut, "description": "Concurrency limit or quota reached"},
        },
    )
    def create_job(
        key: Key,
        response: Response,
        video: Annotated[UploadFile | None, File(description="Talking-head video")] = None,
        audio: Annotated[
            UploadFile | None, File(description="New audio (default: the video's own)")
        ] = None,
        video_url: Annotated[str | None, Form(description="s3://bucket/key instead")] = None,
        audio_url: Annotated[str | None, Form(description="s3://bucket/key instead")] = None,
        steps: Annotated[int | None, Form(description="Denoising steps (20)")] = None,
        guidance: Annotated[float | None, Form(description="Guidance scale (1.5)")] = None,
        seed: Annotated[int | None, Form(description="Random seed (1247)")] = None,
        min_face_size: Annotated[int | None, Form(description="Smallest face, px (64)")] = None,
        loop_video: Annotated[bool | None, Form(description="Ping-pong short video")] = None,
        crf: Annotated[float | None, Form(description="H.264 quality 0-51 (18)")] = None,
        mode: Annotated[str | None, Form(description="Speed/quality mode (exact)")] = None,
        idempotency_key: Annotated[
            str | None,
            Header(alias="Idempotency-Key", description="Same key, same job", max_length=200),
        ] = None,
    ) -> JobOut:
        if idempotency_key:
            with service.pool.connection() as conn:
                existing = db.find_idempotent(conn, key.id, idempotency_key)
            if existing is not None:
                response.status_code = 200
                response.headers["Idempotent-Replayed"] = "true"
                return job_out(existing)
        with service.pool.connection() as conn:
            check_limits(conn, key)
        options = build_options(
            settings,
            {
                "steps": steps, "guidance": guidance, "seed": seed,
                "min_face_size": min_face_size, "loop_video": loop_video, "crf": crf,
                "mode": mode,
            },
        )  # fmt: skip
        job_id = db.new_job_id()
        with job_context(job_id=job_id, key_id=key.id):
            return submit(key, job_id, options, video, audio, video_url, audio_url,
                          idempotency_key, response)  # fmt: skip

    def submit(key, job_id, options, video, audio, video_url, audio_url, idem, response):
        scratch = Path(tempfile.mkdtemp(prefix="lipsync-upload-"))
        stored: list[str] = []
        try:
            budget = settings.max_upload_bytes
            staged_video = _stage("video", video, video_url, scratch, budget)
            if staged_video is None:
                raise ApiError(
                    422, "missing_video", "a video is required: upload 'video' or give 'video_url'"
                )
            staged_audio = _stage("audio", audio, audio_url, scratch, budget - staged_video.size)
            try:
                check_inputs(
                    staged_video.path,
                    staged_audio.path if staged_audio else staged_video.path,
                    scratch,
                    max_duration_s=settings.max_duration_s,
                    face_check_frames=settings.face_check_frames,
                    min_face_size=options.get("min_face_size", 64),
                )
            except InputRejected as exc:
                raise ApiError(exc.status, exc.code, exc.message) from None

            video_key = f"uploads/{job_id}/video{staged_video.suffix}"
            service.storage.put_file(video_key, staged_video.path)
            stored.append(video_key)
            audio_key = video_key
            if staged_audio is not None:
                audio_key = f"uploads/{job_id}/audio{staged_audio.suffix}"
                service.storage.put_file(audio_key, staged_audio.path)
                stored.append(audio_key)

            with db.transaction(service.pool) as conn:
                conn.execute("SELECT id FROM lipsync_api_keys WHERE id = %s FOR UPDATE", (key.id,))
                if idem and (existing := db.find_idempotent(conn, key.id, idem)) is not None:
                    response.status_code = 200
                    response.headers["Idempotent-Replayed"] = "true"
                    _discard(stored)
                    return job_out(existing)
                check_limits(conn, key)
                row = db.insert_job(
                    conn, job_id=job_id, key_id=key.id, options=options, video_key=video_key,
                    audio_key=audio_key, max_attempts=settings.max_attempts,
                    idempotency_key=idem,
                )  # fmt: skip
                queue_job_id = queue.defer(service.queue_app, conn, job_id)
                db.set_queue_job_id(conn, job_id, queue_job_id)
                row["queue_job_id"] = queue_job_id
            stored.clear()  # committed: the uploads belong to the job now
            metrics.JOBS_SUBMITTED.inc()
            log.info("job queued", extra={"queue_job_id": queue_job_id, "options": options})
            response.headers["Location"] = f"/v1/jobs/{job_id}"
            return job_out(row)
        except ApiError as exc:
            log.info("submission refused: %s", exc.detail, extra={"code": exc.code})
            raise
        finally:
            _discard(stored)
            shutil.rmtree(scratch, ignore_errors=True)

    def _discard(keys: list[str]) -> None:
        for k in keys:
            with contextlib.suppress(Exception):
                service.storage.delete(k)
        keys.clear()

    def _stage(role, upload: UploadFile | None, url: str | None, scratch, budget) -> Staged | None:
        if upload is not None and url:
            raise ApiError(422, "ambiguous_input", f"give '{role}' or '{role}_url', not both")
        try:
            if upload is not None:
                return stage_upload(
                    role, upload.file, upload.filename, upload.content_type, scratch, budget
                )
            if url:
                return stage_url(role, url, settings, scratch, budget)
        except InputRejected as exc:
            if exc.code == "too_large":
                exc = too_large(settings.max_upload_bytes)
            raise ApiError(exc.status, exc.code, exc.message) from None
        return None

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=errors, summary="A job")
    def get_job(job_id: str, key: Key) -> JobOut:
        with service.pool.connection() as conn:
            row = db.get_job(conn, job_id, key.id)
        if row is None:
            raise ApiError(404, "not_found", f"no job {job_id}")
        return job_out(row)

    @app.get("/v1/jobs", response_model=JobList, responses=errors, summary="Your jobs")
    def list_jobs(
        key: Key,
        status: Annotated[str | None, Query(description="Only jobs in this status")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        before: Annotated[datetime | None, Query(description="Created before (paging)")] = None,
    ) -> JobList:
        if status is not None and status not in db.STATUSES:
            raise ApiError(422, "bad_status", f"status must be one of {', '.join(db.STATUSES)}")
        with service.pool.connection() as conn:
            rows = db.list_jobs(conn, key.id, limit, status, before)
        return JobList(
            jobs=[job_out(r) for r in rows],
            next_before=rows[-1]["created_at"] if len(rows) == limit else None,
        )

    @app.get(
        "/v1/jobs/{job_id}/result",
        response_class=StreamingResponse,
        responses={
            **errors,
            200: {"content": {"video/mp4": {}}, "description": "The synced video"},
            409: {"model": ErrorOut, "description": "Not (yet) succeeded"},
        },
        summary="Download the result",
    )
    def get_result(job_id: str, key: Key):
        with service.pool.connection() as conn:
            row = db.get_job(conn, job_id, key.id)
        if row is None:
            raise ApiError(404, "not_found", f"no job {job_id}")
        if row["status"] != "succeeded":
            raise ApiError(409, "not_ready", f"job {job_id} is {row['status']}, no result")
        result_key = row["result_key"]
        name = f"lipsync-{job_id}.mp4"
        local = service.storage.local_path(result_key)
        if local is not None:
            if not local.is_file():
                raise ApiError(410, "gone", f"the result of job {job_id} is no longer stored")
            return FileResponse(local, media_type="video/mp4", filename=name)
        size = service.storage.size(result_key)
        if size is None:
            raise ApiError(410, "gone", f"the result of job {job_id} is no longer stored")
        return StreamingResponse(
            service.storage.iter_chunks(result_key),
            media_type="video/mp4",
            headers={
                "Content-Length": str(size),
                "Content-Disposition": f'attachment; filename="{name}"',
            },
        )

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=JobOut,
        responses={
            **errors,
            202: {"model": JobOut, "description": "Running: it stops at the next chunk"},
            409: {"model": ErrorOut, "description": "The job already finished"},
        },
        summary="Cancel a job",
    )
    def cancel_job(job_id: str, key: Key, response: Response) -> JobOut:
        with db.transaction(service.pool) as conn:
            row = db.get_job(conn, job_id, key.id, lock=True)
            if row is None:
                raise ApiError(404, "not_found", f"no job {job_id}")
            if row["status"] in db.TERMINAL:
                raise ApiError(409, "finished", f"job {job_id} already {row['status']}")
            queue_status = queue.cancel(service.queue_app, conn, row["queue_job_id"])
            if queue_status == "doing":  # a worker has it: it stops at the next chunk
                row = db.request_cancel(conn, job_id)
                response.status_code = 202
            else:  # it will never run
                row = db.mark_cancelled(conn, job_id, "cancelled by the user")
        with job_context(job_id=job_id):
            log.info("cancel: job %s", row["status"])
        return job_out(row)

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict:
        return {"status": "ok", "version": __version__}

    @app.get(
        "/readyz",
        summary="Readiness: database and storage reachable",
        responses={503: {"model": ErrorOut}},
    )
    def readyz():
        try:
            with service.pool.connection(timeout=3) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:
            return JSONResponse(
                {"detail": f"database unreachable: {one_line(exc)}", "code": "not_ready"},
                status_code=503,
            )
        try:
            service.storage.check()
        except Exception as exc:
            return JSONResponse(
                {"detail": f"storage unreachable: {one_line(exc)}", "code": "not_ready"},
                status_code=503,
            )
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        with contextlib.suppress(Exception):
            with service.pool.connection(timeout=3) as conn:
                metrics.set_status_counts(db.status_counts(conn))
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


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


__all__ = ["ApiError", "JobOut", "create_app", "openapi_spec", "run_api"]
