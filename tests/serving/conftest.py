"""The job-service fixtures: a real PostgreSQL, a moto S3 server and short face clips, one of
each per session (tests/support/serving_stack.py)."""

from tests.support.serving_stack import moto_server_url, postgres_server, serving_media  # noqa: F401
