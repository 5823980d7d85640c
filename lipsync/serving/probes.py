"""The worker's HTTP port: ``/metrics`` (Prometheus), ``/healthz`` (liveness) and ``/readyz``
(readiness), served from a thread so that they answer while a job runs.

The checks are callables returning ``(ok, detail)``; a failed one answers 503 with
``{"detail": …, "code": "not_ready" | "not_alive"}``, like the API's errors.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

Check = Callable[[], tuple[bool, str]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - probes every few seconds: no access log
        pass


def make_app(live: Check, ready: Check):
    metrics_app = make_wsgi_app()

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics_app(environ, start_response)
        ok, detail = (live if path == "/healthz" else ready)()
        if ok:
            status, body = "200 OK", {"status": detail}
        else:
            code = "not_alive" if path == "/healthz" else "not_ready"
            status, body = "503 Service Unavailable", {"detail": detail, "code": code}
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data)))])  # fmt: skip
        return [data]

    return app


def serve(host: str, port: int, live: Check, ready: Check) -> WSGIServer:
    """Start the server in a daemon thread; returns it (``shutdown()`` stops it)."""
    server = make_server(
        host, port, make_app(live, ready), server_class=_Server, handler_class=_QuietHandler
    )
    threading.Thread(target=server.serve_forever, name="probes", daemon=True).start()
    return server
