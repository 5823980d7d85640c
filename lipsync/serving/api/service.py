"""What the endpoints share: settings, the database pool, storage, the queue app and this
process's scratch folder (uploads are read into it)."""

from __future__ import annotations

import logging
import time
from typing import Annotated

import psycopg
from fastapi import Depends, Request

from lipsync.errors import ConfigError, one_line
from lipsync.serving import db, queue, scratch
from lipsync.serving.settings import ServeSettings
from lipsync.serving.storage import Storage, open_storage

log = logging.getLogger("lipsync.serving.api")

STARTUP_WAIT_S = 30  # how long the API waits for the database when it starts


class Service:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.pool = None
        self.storage: Storage | None = None
        self.queue_app = None
        self.scratch: scratch.Scratch | None = None

    def open(self) -> None:
        url = self.settings.require_database()
        deadline = time.monotonic() + STARTUP_WAIT_S
        while True:
            try:
                db.migrate(url)
                break
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ConfigError(f"cannot reach the database: {one_line(exc)}") from None
                log.warning("database not reachable yet: %s", one_line(exc))
                time.sleep(1)
        self.pool = db.make_pool(url, max_size=16, name="api", timeout_s=self.settings.db_timeout_s)
        self.storage = open_storage(self.settings)
        self.queue_app = queue.make_app(self.settings)
        self.scratch = scratch.Scratch(self.settings.work_dir, "api")
        scratch.purge_orphans(self.settings.work_dir)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.scratch is not None:
            self.scratch.close()


def get_service(request: Request) -> Service:
    return request.app.state.service


Svc = Annotated[Service, Depends(get_service)]
