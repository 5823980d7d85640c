"""The caller's API key, a dependency of every ``/v1`` endpoint. Endpoints declare no body
parameters, so FastAPI resolves the key before a byte of the body is read."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from lipsync.serving import auth
from lipsync.serving.api.errors import MISSING_KEY, ApiError

UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}


def current_key(
    request: Request,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
    x_api_key: Annotated[str | None, Header(description="The API key")] = None,
) -> auth.ApiKey:
    """The caller's API key (401 without a valid one)."""
    presented = auth.key_from_headers(authorization, x_api_key)
    if not presented:
        raise ApiError(401, "unauthorized", MISSING_KEY, UNAUTHORIZED)
    with request.app.state.service.pool.connection() as conn:
        key = auth.lookup(conn, presented)
    if key is None:
        raise ApiError(401, "unauthorized", "invalid or revoked API key", UNAUTHORIZED)
    return key


Key = Annotated[auth.ApiKey, Depends(current_key)]
