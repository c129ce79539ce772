"""Bearer API keys on ``/v1`` routes when ``MM_API_KEY`` is set.

``MM_API_KEY`` holds one key or several separated by commas (one per team or client). A
request's key identifies who it comes from for per-key limits (``MM_MAX_JOBS_PER_KEY``): the
route sees ``request.state.api_key_owner``, a digest of the key, never the key itself, and
that digest is what the job store records.
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import APIError
from service.state import get_state

_bearer = HTTPBearer(auto_error=False, description="One of the server's API keys (MM_API_KEY), when keys are configured.")


def key_owner(key: str) -> str:
    """The stored identity of an API key: a SHA-256 digest prefix (the key is never stored)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def request_owner(request: Request) -> str | None:
    """Who sent the request (see :func:`require_api_key`); None when the server has no keys."""
    return getattr(request.state, "api_key_owner", None)


async def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    keys = get_state(request).settings.api_keys
    if not keys:
        return
    if credentials is None:
        raise APIError(
            401,
            "missing API key: send it as 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    sent = credentials.credentials.encode()
    # compare with every key, so the time taken does not tell which one nearly matched
    matches = [hmac.compare_digest(sent, key.encode()) for key in keys]
    if not any(matches):
        raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    request.state.api_key_owner = key_owner(credentials.credentials)
