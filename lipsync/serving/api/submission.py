"""A submission, from its staged inputs to a queued job: the options checked, ``s3://``
inputs fetched, the media probed and searched for a face, the uploads stored, then the job row
and its queue entry committed together (an accepted job is never lost; a refused one leaves
nothing stored or queued)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from fastapi import Response
from pydantic import ValidationError

from lipsync.errors import ConfigError, one_line
from lipsync.pipeline import RunOptions
from lipsync.serving import auth, db, metrics, queue
from lipsync.serving.api.errors import ApiError
from lipsync.serving.api.form import Submitted
from lipsync.serving.api.limits import check_key_limits
from lipsync.serving.api.schemas import JobForm, JobOut, job_out
from lipsync.serving.inputs import InputRejected, Staged, check_inputs, stage_url, too_large

log = logging.getLogger("lipsync.serving.api")


def parse_fields(given: dict[str, str]) -> JobForm:
    """The text fields, typed (422 ``invalid_request`` naming the first bad one)."""
    try:
        return JobForm(**{k: v for k, v in given.items() if v != ""})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "form"
        raise ApiError(422, "invalid_request", f"{where}: {first['msg']}") from None


def build_options(settings, given: dict[str, Any]) -> dict[str, Any]:
    """The job's RunOptions: what the caller may set (steps, guidance, seed, min_face_size,
    loop_video, crf, mode), checked, plus the service's chunk size."""
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


def replayed(service, key: auth.ApiKey, idem: str | None, response: Response) -> JobOut | None:
    """The job an ``Idempotency-Key`` already created (answered 200), if any."""
    if not idem:
        return None
    with service.pool.connection() as conn:
        existing = db.find_idempotent(conn, key.id, idem)
    if existing is None:
        return None
    response.status_code = 200
    response.headers["Idempotent-Replayed"] = "true"
    return job_out(existing)


def precheck(service, key: auth.ApiKey, idem: str | None, response: Response) -> JobOut | None:
    """Before the body is read: an idempotent replay, or the key's limits (429)."""
    if (replay := replayed(service, key, idem, response)) is not None:
        return replay
    with service.pool.connection() as conn:
        check_key_limits(conn, key, service.settings)
    return None


def submit(
    service, key: auth.ApiKey, job_id: str, form: Submitted, folder: Path, idem: str | None,
    response: Response,
) -> JobOut:  # fmt: skip
    """Check, store and queue a submission whose body was read into ``folder``."""
    settings = service.settings
    given = parse_fields(form.fields)
    options = build_options(settings, given.run_options())
    video = _input("video", form.files.get("video"), given.video_url, service, folder, 0)
    if video is None:
        raise ApiError(
            422, "missing_video", "a video is required: upload 'video' or give 'video_url'"
        )
    audio = _input("audio", form.files.get("audio"), given.audio_url, service, folder, video.size)
    try:
        check_inputs(
            video.path, audio.path if audio else video.path, folder,
            max_duration_s=settings.max_duration_s,
            face_check_frames=settings.face_check_frames,
            min_face_size=options.get("min_face_size", 64),
        )  # fmt: skip
    except InputRejected as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None

    stored: list[str] = []
    try:
        video_key = f"uploads/{job_id}/video{video.suffix}"
        service.storage.put_file(video_key, video.path)
        stored.append(video_key)
        audio_key = video_key
        if audio is not None:
            audio_key = f"uploads/{job_id}/audio{audio.suffix}"
            service.storage.put_file(audio_key, audio.path)
            stored.append(audio_key)
        with db.transaction(service.pool) as conn:
            db.lock_key(conn, key.id)
            if idem and (existing := db.find_idempotent(conn, key.id, idem)) is not None:
                response.status_code = 200  # a concurrent request with the same key won
                response.headers["Idempotent-Replayed"] = "true"
                return job_out(existing)
            check_key_limits(conn, key, settings)
            row = db.insert_job(
                conn, job_id=job_id, key_id=key.id, options=options, video_key=video_key,
                audio_key=audio_key, max_attempts=settings.max_attempts, idempotency_key=idem,
            )  # fmt: skip
            queue_job_id = queue.defer(service.queue_app, conn, job_id)
            db.set_queue_job_id(conn, job_id, queue_job_id)
            row["queue_job_id"] = queue_job_id
        stored.clear()  # committed: the uploads belong to the job now
    finally:
        for k in stored:  # refused, replayed or failed: nothing stays behind
            with contextlib.suppress(Exception):
                service.storage.delete(k)
    metrics.JOBS_SUBMITTED.inc()
    log.info("job queued", extra={"queue_job_id": queue_job_id, "options": options})
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return job_out(row)


def _input(role: str, upload: Staged | None, url: str | None, service, folder: Path, used: int):
    if upload is not None and url:
        raise ApiError(422, "ambiguous_input", f"give '{role}' or '{role}_url', not both")
    if upload is not None or not url:
        return upload
    limit = service.settings.max_upload_bytes
    try:
        return stage_url(role, url, service.settings, folder, limit - used)
    except InputRejected as exc:
        if exc.code == "too_large":
            exc = too_large(limit)
        raise ApiError(exc.status, exc.code, exc.message) from None
