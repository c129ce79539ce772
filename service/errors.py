"""One error shape everywhere: ``{"error": {"message", "type", "param", "code"}}``.

Raise :class:`APIError` in handlers; :func:`install_error_handlers` also converts FastAPI's
request validation errors (its default 422 body is replaced by a 400 in this shape, as the
OpenAI API answers invalid parameters), Starlette's 404/405, and unexpected exceptions (500,
without internals).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobstore.redact import redact_paths, server_locations

log = logging.getLogger("metal_marlin.service")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "server_error",
    507: "insufficient_storage_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


#: Server locations no error body may spell out (see :func:`register_server_paths`).
_server_paths = server_locations(None)


def register_server_paths(data_dir: Path, model_roots: list[Path]) -> None:
    """Add a service's data directory and model roots to what error bodies redact."""
    global _server_paths
    merged = dict(_server_paths)
    merged.update(server_locations(data_dir, model_roots))
    _server_paths = sorted(merged.items(), key=lambda item: len(item[0]), reverse=True)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Every error body the service sends is built here: its message names no server path."""
    return {"error": {"message": redact_paths(message, _server_paths), "type": type, "param": param, "code": code}}


def sse_error(message: str, type: str = "server_error", code: str | None = None, param: str | None = None) -> bytes:
    """A mid-stream error as one SSE event."""
    return f"data: {json.dumps(error_body(message, type, param, code))}\n\n".encode()


# Responses documented on every route (OpenAPI), so clients and schemathesis know the shape.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Not found",
        409: "Conflict with the resource's state (for a model: its files are gone)",
        413: "Request body too large",
        415: "Unsupported Content-Type",
        422: "Idempotency-Key reused with a different body, or settings the export format cannot hold",
        429: "Too many queued jobs or requests in flight",
        500: "The server failed (the message names no server paths; the server log has the details)",
        503: "The worker is not ready",
        504: "The request took longer than MM_REQUEST_TIMEOUT",
        507: "The storage quota for uploads and results (MM_MAX_DATA_BYTES) is used up",
    }
    return {s: {"model": ErrorResponse, "description": descriptions.get(s, "Error")} for s in statuses}


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "[key]"]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    # pydantic adds the union member's tag to the location (e.g. model.path.source); keep it short
    return ".".join(parts) or None


def _validation_message(err: dict[str, Any]) -> tuple[str, str | None, str]:
    kind = err.get("type", "")
    loc = tuple(err.get("loc", ()))
    param = _loc_to_param(loc)
    if kind == "json_invalid":
        return "the request body is not valid JSON", None, "invalid_json"
    if kind == "missing":
        where = param or "request body"
        return f"missing required parameter: {where}", param, "missing_required_parameter"
    msg = err.get("msg", "invalid value")
    if param:
        return f"invalid value for {param}: {msg}", param, "invalid_value"
    return f"invalid request: {msg}", None, "invalid_value"


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API documents at this path (one path may be served by several routes)."""
    path = request.url.path
    methods: set[str] = set()
    for template, ops in request.app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods.update(m.upper() for m in ops)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message, param, code = _validation_message(errors[0]) if errors else ("invalid request", None, "invalid_value")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message, code = f"no route {request.method} {request.url.path}", "not_found"
        elif status == 405:
            message, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(
            error_body(message, ERROR_TYPES.get(status, "invalid_request_error"), None, code),
            status_code=status,
            headers=headers or None,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"), status_code=500)
