"""A local stand-in for the Hugging Face Hub's file endpoints (``HF_ENDPOINT``): enough of
``/<repo>/resolve/<revision>/<file>`` (HEAD and GET, with the commit and ETag headers
``huggingface_hub`` checks) for the real ``hf_hub_download`` to fetch files from it."""

from __future__ import annotations

import hashlib
import http.server
import threading
from contextlib import contextmanager


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def _file(self) -> bytes | None:
        repo, sep, rest = self.path.split("?")[0].lstrip("/").partition("/resolve/")
        if not sep:
            return None
        filename = rest.partition("/")[2]  # after the revision
        return self.files.get(f"{repo}/{filename}")

    def _answer(self, body: bool) -> None:
        data = self._file()
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)


@contextmanager
def fake_hub(files: dict[str, bytes]):
    """Serve ``{"owner/repo/path/in/repo": bytes}``; yields the endpoint URL."""
    handler = type("Handler", (_Handler,), {"files": dict(files)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
