"""Service settings: environment variables (``LIPSYNC_<FIELD>``, plus ``DATABASE_URL``), then
command-line flags on top.

>>> s = ServeSettings.from_env(preset="tiny")       # flags given on the command line win
>>> s.database_url, s.storage_url, s.max_upload_bytes

Every field below can be set as ``LIPSYNC_<NAME>`` in upper case (``LIPSYNC_MAX_UPLOAD_BYTES``);
lists are comma-separated. ``DATABASE_URL`` is also read without the prefix.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lipsync.config import LoadOptions
from lipsync.constants import CompileOption
from lipsync.errors import ConfigError

ENV_PREFIX = "LIPSYNC_"


class ServeSettings(BaseModel):
    """Everything the API and the workers are configured with (docs/SERVING.md lists them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # where things live
    database_url: str = Field("", description="PostgreSQL URL (postgresql://user@host/db).")
    storage_url: str = Field(
        "file://./lipsync-data",
        description="Uploads and results: file:///path (or a plain path) or s3://bucket[/prefix].",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, …).")
    s3_region: str = Field("us-east-1", description="S3 region.")
    input_url_buckets: list[str] = Field(
        default_factory=list,
        description="Buckets that s3:// input URLs may name (empty: URL inputs are refused).",
    )

    # limits
    max_upload_bytes: int = Field(512 * 1024**2, gt=0, description="Video + audio bytes per job.")
    max_duration_s: float = Field(600.0, gt=0, description="Longest video or audio accepted.")
    max_concurrency_per_key: int = Field(
        4, ge=1, description="Queued + running jobs per key (a key's own limit wins)."
    )
    quota_per_key: int | None = Field(
        None, ge=1, description="Jobs per key per 24 h (None: unlimited; a key's own wins)."
    )
    max_steps: int = Field(100, ge=1, description="Largest `steps` a job may ask for.")
    face_check_frames: int = Field(
        5, ge=0, description="Frames sampled for a face before queueing (0: no check)."
    )

    # the model
    preset: str = Field("v1.6", description="Model preset the workers load.")
    device: str | None = Field(None, description="cuda or cpu (default: cuda if present).")
    dtype: str | None = Field(None, description="fp16, bf16 or fp32.")
    checkpoint_dir: str | None = Field(None, description="Checkpoint cache folder.")
    cpu_threads: int | None = Field(None, ge=1, description="Torch threads on the CPU.")
    compile: CompileOption = Field(
        "none",
        description="torch.compile the U-Net (runner=engine); auto: compiled from matching "
        "precompiled artefacts (lipsync warmup), else eager.",
    )
    fp8: bool = Field(False, description="FP8 U-Net linear layers, CUDA (runner=engine).")
    chunk_frames: int = Field(16, ge=1, le=24, description="Frames per model chunk at first try.")
    runner: str = Field(
        "auto",
        description="What runs a job: auto (triton if triton_url, else engine), engine, "
        "triton, or module:factory (a callable taking the settings).",
    )
    triton_url: str | None = Field(None, description="Triton server URL (runner=triton).")
    triton_protocol: str | None = Field(None, description="grpc or http (default: from the URL).")
    triton_shared_memory: str | None = Field(None, description="Triton shared memory mode.")
    triton_timeout_s: float | None = Field(None, gt=0, description="Triton request timeout.")
    triton_wait_s: float = Field(
        600.0, ge=0,
        description="How long a worker waits for an unreachable Triton: at start, and after a "
        "job's attempt failed on it, before it takes another job (that job is retried).",
    )  # fmt: skip

    # the queue
    queue: str = Field("lipsync", description="Procrastinate queue name.")
    max_attempts: int = Field(4, ge=1, description="Tries per job (failed runs, lost workers).")
    retry_backoff_s: float = Field(2.0, ge=0, description="First retry delay; doubles per failure.")
    retry_backoff_max_s: float = Field(300.0, ge=0, description="Longest retry delay.")
    heartbeat_s: float = Field(10.0, gt=0, description="Worker heartbeat interval.")
    stalled_after_s: float = Field(
        30.0, gt=0, description="A worker silent this long is dead; its job is retried."
    )
    sweep_interval_s: float = Field(10.0, gt=0, description="How often workers look for them.")
    poll_interval_s: float = Field(1.0, gt=0, description="Queue polling (besides LISTEN).")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="SIGTERM: finish the current job within this, else release it."
    )
    progress_interval_s: float = Field(
        0.5, ge=0, description="Least time between progress writes (cancellation is checked then)."
    )

    # database outages (docs/SERVING.md, "Failure model")
    db_timeout_s: float = Field(
        5.0, gt=0, description="Longest wait for one database connection (connect or pool)."
    )
    db_retry_s: float = Field(
        0.5, gt=0, description="First wait after a database call failed; doubles per failure."
    )
    db_retry_max_s: float = Field(5.0, gt=0, description="Longest wait between database retries.")
    db_outage_limit_s: float = Field(
        900.0, gt=0,
        description="A worker that cannot reach the database for this long exits (code 3); "
        "its job is recovered by the other workers' sweep.",
    )  # fmt: skip

    # processes
    host: str = Field("127.0.0.1", description="Interface the API and worker metrics listen on.")
    port: int = Field(8000, ge=0, le=65535, description="API port.")
    worker_metrics_port: int = Field(
        9100, ge=0, le=65535, description="Worker /metrics port (0: none)."
    )
    worker_name: str | None = Field(None, description="Worker name in logs (default host:pid).")
    work_dir: str | None = Field(None, description="Worker scratch folder (default: temp).")
    log_level: str = Field("INFO", description="Log level.")
    log_json: bool = Field(True, description="JSON log lines (false: plain text).")

    @field_validator("input_url_buckets", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Settings from ``env`` (default ``os.environ``), then ``overrides`` (None = unset)."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        if env.get("DATABASE_URL"):
            values["database_url"] = env["DATABASE_URL"]
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = None if raw.lower() in ("none", "null") else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise ConfigError(
                f"invalid setting {field} ({ENV_PREFIX}{field.upper()}): {first['msg']}"
            ) from None

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "no database: set DATABASE_URL (e.g. postgresql://lipsync@localhost/lipsync) "
                "or pass --database-url"
            )
        return self.database_url

    def load_options(self) -> LoadOptions:
        """How a worker with ``runner=engine`` loads the model (:mod:`lipsync.loading`)."""
        return LoadOptions(
            preset=self.preset, device=self.device, dtype=self.dtype,
            checkpoint_dir=self.checkpoint_dir, cpu_threads=self.cpu_threads,
            compile=self.compile, fp8=self.fp8,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """The settings for logs, with the database password hidden."""
        d = self.model_dump()
        d["database_url"] = _hide_password(d["database_url"])
        return d


def _hide_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
