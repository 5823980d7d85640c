"""API keys: ``lsk_`` + 43 random URL-safe characters (256 bits), shown once at creation.

Only the key's SHA-256 is stored (a key has full entropy, so a plain hash is enough; no salt or
slow hash is needed), plus its first characters (``prefix``) to recognise it in listings. Lookup
is by hash, and the stored hash is compared again in constant time. A revoked key stops working
at once; its jobs stay.

Per-key limits: ``max_concurrency`` (queued + running jobs at once) and ``quota`` (jobs per
24 hours); unset limits fall back to the service settings.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

import psycopg

from lipsync.errors import ConfigError

KEY_PREFIX = "lsk_"


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    prefix: str
    max_concurrency: int | None
    quota: int | None
    created_at: datetime | None = None
    revoked_at: datetime | None = None

    @classmethod
    def from_row(cls, row: dict) -> ApiKey:
        return cls(
            id=row["id"], name=row["name"], prefix=row["prefix"],
            max_concurrency=row["max_concurrency"], quota=row["quota"],
            created_at=row.get("created_at"), revoked_at=row.get("revoked_at"),
        )  # fmt: skip

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "max_concurrency": self.max_concurrency,
            "quota": self.quota,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(
    conn: psycopg.Connection,
    name: str,
    max_concurrency: int | None = None,
    quota: int | None = None,
) -> tuple[str, ApiKey]:
    """A new key: returns (the secret, shown only now; its record)."""
    if not name.strip():
        raise ConfigError("a key needs a name (--name)")
    for label, value in (("concurrency", max_concurrency), ("quota", quota)):
        if value is not None and value < 1:
            raise ConfigError(f"--{label} must be at least 1, got {value}")
    secret = generate_key()
    row = conn.execute(
        "INSERT INTO lipsync_api_keys (name, prefix, key_hash, max_concurrency, quota) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING *",
        (name.strip(), secret[: len(KEY_PREFIX) + 6], hash_key(secret), max_concurrency, quota),
    ).fetchone()
    return secret, ApiKey.from_row(row)


def lookup(conn: psycopg.Connection, presented: str | None) -> ApiKey | None:
    """The active key matching ``presented``, or None (unknown, revoked, malformed)."""
    if not presented or not presented.startswith(KEY_PREFIX) or len(presented) > 200:
        return None
    digest = hash_key(presented)
    row = conn.execute(
        "SELECT * FROM lipsync_api_keys WHERE key_hash = %s AND revoked_at IS NULL", (digest,)
    ).fetchone()
    if row is None or not hmac.compare_digest(row["key_hash"], digest):
        return None
    return ApiKey.from_row(row)


def list_keys(conn: psycopg.Connection, include_revoked: bool = False) -> list[ApiKey]:
    sql = "SELECT * FROM lipsync_api_keys"
    if not include_revoked:
        sql += " WHERE revoked_at IS NULL"
    return [ApiKey.from_row(r) for r in conn.execute(sql + " ORDER BY id").fetchall()]


def revoke_key(conn: psycopg.Connection, ident: str) -> list[ApiKey]:
    """Revoke by id, name or prefix; returns the keys revoked (several if a name is shared)."""
    if ident.isdigit():
        where, arg = "id = %s", int(ident)
    elif ident.startswith(KEY_PREFIX):
        where, arg = "prefix = %s", ident
    else:
        where, arg = "name = %s", ident
    rows = conn.execute(
        f"UPDATE lipsync_api_keys SET revoked_at = now() WHERE {where} AND revoked_at IS NULL "
        "RETURNING *",
        (arg,),
    ).fetchall()
    return [ApiKey.from_row(r) for r in rows]


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None
