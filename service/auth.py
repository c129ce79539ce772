"""Bearer API key on ``/v1`` routes when ``MM_API_KEY`` is set."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import APIError
from service.state import get_state

_bearer = HTTPBearer(auto_error=False, description="The server's API key (MM_API_KEY), when one is configured.")


async def require_api_key(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> None:
    expected = get_state(request).settings.api_key
    if expected is None:
        return
    if credentials is None:
        raise APIError(
            401,
            "missing API key: send it as 'Authorization: Bearer <key>'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
