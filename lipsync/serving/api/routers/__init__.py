"""The API's routes: :mod:`.jobs` (``/v1/jobs…``) and :mod:`.ops` (health, readiness, metrics)."""
