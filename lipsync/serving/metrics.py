"""Prometheus metrics (prometheus-client, default registry; each process exposes its own).

API (``GET /metrics``): HTTP requests and latency, jobs submitted / rejected by reason, queue depth
and jobs by status (read from the database at scrape time).
Workers (``--metrics-port``, default 9100): job run time and end-to-end latency, failures and
retries by reason, jobs in progress, frames processed, queue depth (refreshed by the stalled-job
sweep), GPU memory when CUDA is in use.

Reasons are short classes (``oom``, ``user_error``, ``worker_lost``, ``internal``, ``cancelled``),
never free text, so label sets stay small.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)

# API
HTTP_REQUESTS = Counter(
    "lipsync_http_requests_total", "HTTP requests", ["method", "route", "status"]
)
HTTP_SECONDS = Histogram(
    "lipsync_http_request_seconds", "HTTP request duration", ["method", "route"]
)
JOBS_SUBMITTED = Counter("lipsync_jobs_submitted_total", "Jobs accepted by the API")
JOBS_REJECTED = Counter(
    "lipsync_jobs_rejected_total", "Job submissions refused, by reason", ["reason"]
)
BODY_BYTES = Counter(
    "lipsync_http_request_body_bytes_total", "Request body bytes read from clients"
)

# both
QUEUE_DEPTH = Gauge("lipsync_queue_depth", "Jobs waiting to run (status queued)")
JOBS_BY_STATUS = Gauge("lipsync_jobs", "Jobs in the database by status", ["status"])
DATABASE_UP = Gauge("lipsync_database_up", "1 while this process reaches the database, else 0")
DATABASE_OUTAGES = Counter(
    "lipsync_database_outages_total", "Times this process lost the database (first failed call)"
)

# workers
JOB_SECONDS = Histogram(
    "lipsync_job_run_seconds", "Time one attempt ran, by outcome", ["outcome"],
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
JOB_LATENCY = Histogram(
    "lipsync_job_latency_seconds", "Submission to result, for succeeded jobs",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
JOB_FAILURES = Counter(
    "lipsync_job_failures_total", "Jobs that ended failed, by reason", ["reason"]
)
JOB_RETRIES = Counter("lipsync_job_retries_total", "Attempts retried, by reason", ["reason"])
JOBS_IN_PROGRESS = Gauge("lipsync_jobs_in_progress", "Jobs this worker is running")
JOBS_SUCCEEDED = Counter("lipsync_jobs_succeeded_total", "Jobs this worker completed")
JOBS_CANCELLED = Counter("lipsync_jobs_cancelled_total", "Running jobs stopped by a cancel")
FRAMES = Counter("lipsync_frames_total", "Output frames produced")
WORKER_REGISTERED = Gauge(
    "lipsync_worker_registered", "1 while this worker is registered and heartbeating, else 0"
)
JOBS_RECONCILED = Counter(
    "lipsync_jobs_reconciled_total",
    "Job rows whose queue entry had ended without them, by what the sweep did",
    ["action"],
)
GPU_MEMORY = Gauge("lipsync_gpu_memory_bytes", "CUDA memory of this worker", ["kind"])


def set_status_counts(counts: dict[str, int]) -> None:
    for status, n in counts.items():
        JOBS_BY_STATUS.labels(status=status).set(n)
    QUEUE_DEPTH.set(counts.get("queued", 0))


def update_gpu_memory() -> None:
    """Refresh the GPU gauges (nothing without CUDA)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    GPU_MEMORY.labels(kind="allocated").set(torch.cuda.memory_allocated())
    GPU_MEMORY.labels(kind="reserved").set(torch.cuda.memory_reserved())
    GPU_MEMORY.labels(kind="peak").set(torch.cuda.max_memory_allocated())
