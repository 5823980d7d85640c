"""The lip-sync job service (docs/SERVING.md).

* :mod:`~lipsync.serving.settings` -- one :class:`~lipsync.serving.settings.ServeSettings` from
  the environment (``LIPSYNC_*``, ``DATABASE_URL``) and command-line flags;
* :mod:`~lipsync.serving.db` -- our ``jobs`` and ``api_keys`` tables, migrations applied at start;
* :mod:`~lipsync.serving.auth` -- API keys (stored as SHA-256 hashes);
* :mod:`~lipsync.serving.queue` -- the PostgreSQL queue (procrastinate): retry decisions,
  attempt outcomes, the sweep (lost workers, reconciliation), cancellation;
* :mod:`~lipsync.serving.outage` -- riding out database outages (which errors, how long to wait);
* :mod:`~lipsync.serving.storage` -- uploads and results on a filesystem or S3, written atomically;
* :mod:`~lipsync.serving.scratch` -- per-process scratch folders, purged once their process died;
* :mod:`~lipsync.serving.worker` -- ``lipsync serve worker``: runs jobs with a pluggable runner;
* :mod:`~lipsync.serving.consumer` -- the worker's loop: registration, heartbeats, fetching;
* :mod:`~lipsync.serving.api` -- ``lipsync serve api``: the FastAPI HTTP API (a package);
* :mod:`~lipsync.serving.metrics`, :mod:`~lipsync.serving.probes` -- Prometheus metrics of the
  API and the workers, the workers' ``/healthz`` and ``/readyz``.

Nothing here is imported by ``import lipsync``; the service needs the ``serve`` extra
(``pip install -e ".[serve]"``).
"""
