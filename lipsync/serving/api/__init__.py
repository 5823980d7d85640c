"""``lipsync serve api``: the HTTP job API (FastAPI). docs/SERVING.md has curl examples.

=======================================  =====================================================
``POST /v1/jobs``                        submit: multipart ``video`` (+ ``audio``) uploads or
                                         ``video_url`` / ``audio_url`` (``s3://``); options
                                         ``steps``, ``guidance``, ``seed``, ``min_face_size``,
                                         ``loop_video``, ``crf``, ``mode``;
                                         ``Idempotency-Key`` header
``GET /v1/jobs``                         the caller's jobs, newest first
``GET /v1/jobs/{id}``                    status, progress, attempts, error, report
``GET /v1/jobs/{id}/result``             the synced video (streamed)
``DELETE /v1/jobs/{id}``                 cancel (queued: at once; running: between chunks)
``GET /healthz`` ``/readyz`` ``/metrics``  liveness, readiness (database + storage), Prometheus
=======================================  =====================================================

Authentication: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (401 without a valid
one). A key sees only its own jobs (another key's job is a 404). Errors -- all of them, unknown
paths included -- are JSON ``{"detail": "<one line>", "code": "<machine-readable>"}``
(:mod:`.errors`); 503 ``unavailable`` while the database cannot be reached.

A submission is settled in this order, so that nobody can make the API read or store what it
will refuse: the key (401), the key's limits or an idempotent replay, then the body, read as
it streams into a scratch folder within the upload limit (:mod:`.form`; every request's body is
also capped by :class:`.limits.BodyLimit`), then the checks of :mod:`.submission` (content type
415, size 413, probe / decode / duration 422 or 413, a face 422). Uploads are written to
storage before the job row is committed, and the row and its queue entry are committed
together: an accepted job is never lost, and a refused one leaves nothing queued.

Modules: :mod:`.app` (``create_app``), :mod:`.routers` (the endpoints), :mod:`.schemas`,
:mod:`.limits`, :mod:`.form`, :mod:`.submission`, :mod:`.security` (the key),
:mod:`.service` (what the endpoints share), :mod:`.errors`.
"""

from lipsync.serving.api.app import create_app, openapi_spec, run_api
from lipsync.serving.api.errors import ApiError
from lipsync.serving.api.schemas import JobOut

__all__ = ["ApiError", "JobOut", "create_app", "openapi_spec", "run_api"]
