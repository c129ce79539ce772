"""ASGI middleware: request body size limit, and request metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body
from service.metrics import ServiceMetrics


STREAMED_SLACK = 64 * 1024


def too_large_message(limit: int) -> str:
    return f"the request body exceeds the limit of {limit} bytes"


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(error_body(too_large_message(limit), "invalid_request_error", None, "request_too_large")).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class TrailingSlash:
    """``/v1/files/`` is ``/v1/files``: drop one trailing slash from the path before anything
    routes or limits by it (OpenAI's clients and docs use both spellings; a redirect would
    make an upload send its body twice, and meet the other routes' body limit first)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path[:-1]}
            if isinstance(scope.get("raw_path"), bytes) and scope["raw_path"].endswith(b"/"):
                scope["raw_path"] = scope["raw_path"][:-1]
        await self.app(scope, receive, send)


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes with 413: by Content-Length up front, else while reading.

    ``streamed`` maps ``(method, path)`` of upload routes to their own (larger) limit: their
    bodies are checked by Content-Length up front and then passed through unbuffered; the
    route reads the stream and enforces the limit itself while it writes to disk. The
    Content-Length check allows ``STREAMED_SLACK`` bytes of form framing beyond the limit.
    """

    def __init__(self, app: ASGIApp, limit: int, streamed: dict[tuple[str, str], int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.streamed = streamed or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        streamed_limit = self.streamed.get((scope.get("method", ""), scope.get("path", "")))
        limit = self.limit if streamed_limit is None else streamed_limit
        slack = 0 if streamed_limit is None else STREAMED_SLACK
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit + slack:
                    await _send_413(send, limit)
                    return
        if streamed_limit is not None:
            await self.app(scope, receive, send)
            return
        # Read the whole body first (it is small by construction) so an oversized chunked
        # body is refused before any route sees it; then replay it to the app.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            received += len(body)
            if received > self.limit:
                await _send_413(send, self.limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestMetrics:
    """Count requests by method, route template and status; time to response headers."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def wrapped_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                self.metrics.request_seconds.observe(time.perf_counter() - started, route=_route(scope))
            await send(message)

        try:
            await self.app(scope, receive, wrapped_send)
        finally:
            self.metrics.requests.inc(method=scope.get("method", ""), route=_route(scope), status=str(status["code"]))


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
