"""What the API's bodies look like: the job (:class:`JobOut`), lists, errors, and the fields of
a submission (:class:`JobForm`, read from the multipart body by :mod:`.form`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lipsync.serving import db


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


class JobForm(BaseModel):
    """The text fields of ``POST /v1/jobs`` (the files are ``video`` and ``audio``)."""

    model_config = ConfigDict(extra="ignore")

    video_url: str | None = Field(None, description="s3://bucket/key instead of 'video'")
    audio_url: str | None = Field(None, description="s3://bucket/key instead of 'audio'")
    steps: int | None = Field(None, description="Denoising steps (20)")
    guidance: float | None = Field(None, description="Guidance scale (1.5)")
    seed: int | None = Field(None, description="Random seed (1247)")
    min_face_size: int | None = Field(None, description="Smallest face, px (64)")
    loop_video: bool | None = Field(None, description="Ping-pong short video")
    crf: float | None = Field(None, description="H.264 quality 0-51 (18)")
    mode: str | None = Field(None, description="Speed/quality mode (exact)")

    def run_options(self) -> dict[str, Any]:
        """The options a caller may set, as given (None: not given)."""
        return self.model_dump(exclude={"video_url", "audio_url"})


def form_schema() -> dict[str, Any]:
    """The multipart body of ``POST /v1/jobs`` for the OpenAPI document."""
    schema = JobForm.model_json_schema()
    files = {
        "video": {"type": "string", "format": "binary", "description": "Talking-head video"},
        "audio": {"type": "string", "format": "binary",
                  "description": "New audio (default: the video's own)"},
    }  # fmt: skip
    return {
        "title": "JobSubmission",
        "type": "object",
        "properties": {**files, **schema["properties"]},
    }


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
