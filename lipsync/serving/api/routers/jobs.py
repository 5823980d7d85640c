"""``/v1/jobs``: submit, read, list, download, cancel. Every route needs a key (401)."""

from __future__ import annotations

import logging
import shutil
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse

from lipsync.serving import db, queue
from lipsync.serving.api import submission
from lipsync.serving.api.errors import ApiError
from lipsync.serving.api.form import read_form
from lipsync.serving.api.schemas import ErrorOut, JobList, JobOut, form_schema, job_out
from lipsync.serving.api.security import Key
from lipsync.serving.api.service import Svc
from lipsync.serving.logs import job_context

log = logging.getLogger("lipsync.serving.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ERRORS = {
    401: {"model": ErrorOut, "description": "Missing or invalid API key"},
    404: {"model": ErrorOut, "description": "No such job (for this key)"},
    503: {"model": ErrorOut, "description": "The database is unreachable; retry later"},
}


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Submit a lip-sync job",
    responses={
        **ERRORS,
        200: {"model": JobOut, "description": "Idempotent replay: the job already created"},
        403: {"model": ErrorOut, "description": "Input bucket not allowed"},
        413: {"model": ErrorOut, "description": "Upload too large or too long"},
        415: {"model": ErrorOut, "description": "Wrong content type"},
        422: {"model": ErrorOut, "description": "Bad input (unreadable, no face, options)"},
        429: {"model": ErrorOut, "description": "Concurrency limit or quota reached"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": form_schema()}},
        }
    },
)
async def create_job(
    request: Request,
    key: Key,
    service: Svc,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Same key, same job", max_length=200),
    ] = None,
) -> JobOut:
    """Multipart uploads `video` (+ `audio`) or `video_url` / `audio_url` (s3://), and the
    options. The key, its limits and an idempotent replay are settled before the body is
    read; the body is then read as it arrives, within the upload limit."""
    replay = await run_in_threadpool(submission.precheck, service, key, idempotency_key, response)
    if replay is not None:
        return replay
    job_id = db.new_job_id()
    with job_context(job_id=job_id, key_id=key.id):
        folder = service.scratch.mkdtemp(prefix="upload-")
        try:
            form = await read_form(request, folder, service.settings.max_upload_bytes)
            return await run_in_threadpool(
                submission.submit, service, key, job_id, form, folder, idempotency_key, response
            )
        except ApiError as exc:
            log.info("submission refused: %s", exc.detail, extra={"code": exc.code})
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS, summary="A job")
def get_job(job_id: str, key: Key, service: Svc) -> JobOut:
    with service.pool.connection() as conn:
        row = db.get_job(conn, job_id, key.id)
    if row is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    return job_out(row)


@router.get("", response_model=JobList, responses=ERRORS, summary="Your jobs")
def list_jobs(
    key: Key,
    service: Svc,
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


@router.get(
    "/{job_id}/result",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {"content": {"video/mp4": {}}, "description": "The synced video"},
        409: {"model": ErrorOut, "description": "Not (yet) succeeded"},
    },
    summary="Download the result",
)
def get_result(job_id: str, key: Key, service: Svc):
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


@router.delete(
    "/{job_id}",
    response_model=JobOut,
    responses={
        **ERRORS,
        202: {"model": JobOut, "description": "Running: it stops at the next chunk"},
        409: {"model": ErrorOut, "description": "The job already finished"},
    },
    summary="Cancel a job",
)
def cancel_job(job_id: str, key: Key, service: Svc, response: Response) -> JobOut:
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
