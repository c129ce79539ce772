"""Relay generations from the worker: open NDJSON streams, merge them, turn failures into errors.

One client request may need several worker generations (a list of prompts, ``n`` > 1); each
is a ``POST /generate`` stream on the worker. :class:`WorkerGenerations` opens them all
before the client gets a status line, so anything the worker refuses up front (unknown
model, bad parameter, prompt too long) becomes a proper HTTP error. After that, lines are
merged in arrival order. A broken stream (worker crash, timeout) yields an ``error`` line,
never a hang. Closing the relay (client gone) closes every worker stream, and the worker
cancels those generations.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from service.errors import APIError
from worker.protocol import StreamLine

log = logging.getLogger("metal_marlin.service.relay")

WORKER_GONE = {
    "message": "the worker stopped during generation (it is being restarted); retry the request",
    "type": "service_unavailable_error",
    "code": "worker_unavailable",
}


@dataclass
class Item:
    index: int
    line: StreamLine


def _worker_error(status: int, body: bytes) -> APIError:
    try:
        err = json.loads(body)["error"]
        message, type_, param, code = err["message"], err.get("type"), err.get("param"), err.get("code")
    except (ValueError, KeyError, TypeError):
        message, type_, param, code = f"the worker answered {status}", None, None, None
    if status in (400, 404, 503):
        return APIError(status, message, type=type_, param=param, code=code, headers={"Retry-After": "5"} if status == 503 else None)
    log.error("worker error %d: %s", status, message)
    return APIError(500, message if status == 500 else "internal error talking to the worker", code=code or "worker_error")


class WorkerGenerations:
    def __init__(self, client: httpx.AsyncClient, payloads: list[dict[str, Any]]) -> None:
        self.client = client
        self.payloads = payloads
        self._responses: list[httpx.Response | None] = [None] * len(payloads)
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[Item | int] = asyncio.Queue()
        self._closed = False

    async def _open_one(self, i: int) -> None:
        request = self.client.build_request("POST", "/generate", json=self.payloads[i])
        try:
            response = await self.client.send(request, stream=True)
        except (httpx.TransportError, OSError) as exc:
            raise APIError(503, "the worker is not reachable; retry shortly", code="worker_unavailable", headers={"Retry-After": "5"}) from exc
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            raise _worker_error(response.status_code, body)
        self._responses[i] = response

    async def open(self) -> None:
        """Start every generation; raise the first refusal as an :class:`APIError`."""
        results = await asyncio.gather(*(self._open_one(i) for i in range(len(self.payloads))), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.aclose()
            raise errors[0]
        for i in range(len(self.payloads)):
            self._tasks.append(asyncio.create_task(self._pump(i)))

    async def _pump(self, i: int) -> None:
        response = self._responses[i]
        assert response is not None
        finished = False
        try:
            async for raw in response.aiter_lines():
                if not raw.strip():
                    continue
                line = StreamLine.model_validate_json(raw)
                await self._queue.put(Item(i, line))
                if line.event in ("done", "error"):
                    finished = True
                    break
        except (httpx.TransportError, OSError, ValueError) as exc:
            log.warning("worker stream %d broke: %s", i, exc)
        finally:
            if not finished and not self._closed:
                await self._queue.put(Item(i, StreamLine(event="error", error=dict(WORKER_GONE))))
            await self._queue.put(i)

    async def lines(self) -> AsyncIterator[Item]:
        """Merged lines of all generations until each has ended (``done`` or ``error``)."""
        remaining = len(self._tasks)
        while remaining:
            item = await self._queue.get()
            if isinstance(item, int):
                remaining -= 1
                continue
            yield item

    async def aclose(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        for response in self._responses:
            if response is not None:
                await response.aclose()
