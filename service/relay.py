"""Relay generations from the worker: open NDJSON streams, merge them, turn failures into errors.

One client request may need several worker generations (a list of prompts, ``n`` > 1); each
is a ``POST /generate`` stream on the worker. :class:`WorkerGenerations` opens them all
before the client gets a status line, so anything the worker refuses up front (unknown
model, bad parameter, prompt too long) becomes a proper HTTP error. After that, lines are
merged in arrival order. A broken stream (worker crash) yields an ``error`` line, never a
hang, unless the generation had produced no token yet: then it was still waiting on that
worker (queued behind a full batch, or being prefilled), nothing of it reached the client, and
it is reopened with the same payload on the worker that ``next_client`` names (see
:meth:`WorkerGenerations._pump`); its lines go on as if nothing happened. Closing the relay
(client gone) closes every worker stream, and the worker cancels those generations.

Time limits live here, for streamed and non-streamed requests alike: the whole request
(opening included) must end within ``timeout_s`` (``MM_REQUEST_TIMEOUT``), and with
``idle_timeout_s`` (``MM_STREAM_IDLE_TIMEOUT``, given for streams) the worker streams may not
go that long without a line once the first token came. Before it only the deadline counts:
the worker sends nothing while a request waits for a batch row or its prompt is prefilled,
which on a loaded CPU worker can take longer than a healthy gap between tokens. Past either
limit, :meth:`WorkerGenerations.open` or
:meth:`WorkerGenerations.lines` raises :class:`GenerationTimeout` (504, code
``request_timeout`` or ``stream_timeout``); the caller then closes the relay, which cancels
the worker's generations.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from service.errors import APIError
from worker.protocol import StreamLine

log = logging.getLogger("metal_marlin.service.relay")

WORKER_GONE = {
    "message": "the worker stopped during generation; retry the request",
    "type": "service_unavailable_error",
    "code": "worker_unavailable",
}


class GenerationTimeout(APIError):
    """A request ran past its time limit (504); its generations are to be cancelled."""


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
    if status in (400, 404, 409, 503):
        return APIError(status, message, type=type_, param=param, code=code, headers={"Retry-After": "5"} if status == 503 else None)
    log.error("worker error %d: %s", status, message)
    return APIError(500, message if status == 500 else "internal error talking to the worker", code=code or "worker_error")


#: ``next_client(failed)``: the client of another worker to reopen a generation on after
#: ``failed`` broke before its first token (the callee marks that worker down), or None.
NextClient = Callable[[httpx.AsyncClient], Awaitable[httpx.AsyncClient | None]]


class WorkerGenerations:
    def __init__(
        self,
        client: httpx.AsyncClient,
        payloads: list[dict[str, Any]],
        *,
        timeout_s: float,
        idle_timeout_s: float | None = None,
        next_client: NextClient | None = None,
    ) -> None:
        self.client = client
        self.payloads = payloads
        self.next_client = next_client
        self._clients = [client] * len(payloads)  # where each generation runs now
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._responses: list[httpx.Response | None] = [None] * len(payloads)
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[Item | int] = asyncio.Queue()
        self._closed = False

    async def _open_one(self, i: int) -> None:
        client = self._clients[i]
        request = client.build_request("POST", "/generate", json=self.payloads[i])
        try:
            response = await client.send(request, stream=True)
        except (httpx.TransportError, OSError) as exc:
            raise APIError(503, "the worker is not reachable; retry shortly", code="worker_unavailable", headers={"Retry-After": "5"}) from exc
        if response.status_code != 200:
            body = await response.aread()
            await response.aclose()
            raise _worker_error(response.status_code, body)
        self._responses[i] = response

    async def _within_limits(self, awaitable: Awaitable[Any], *, idle_limited: bool) -> Any:
        """``await awaitable``, or raise :class:`GenerationTimeout` when the nearer limit passes
        first: the request's deadline, or (``idle_limited``) the idle timeout from this call."""
        left = self._deadline - time.monotonic()
        idle = idle_limited and self.idle_timeout_s is not None and self.idle_timeout_s < left
        try:
            return await asyncio.wait_for(awaitable, self.idle_timeout_s if idle else max(left, 0.0))
        except asyncio.TimeoutError:
            if idle:
                message = f"the worker sent nothing for {self.idle_timeout_s:g} s (the server's stream idle timeout); the generation was cancelled"
                raise GenerationTimeout(504, message, code="stream_timeout") from None
            message = f"the request took longer than {self.timeout_s:g} s (the server's request timeout); the generation was cancelled"
            raise GenerationTimeout(504, message, code="request_timeout") from None

    async def open(self) -> None:
        """Start every generation; raise the first refusal as an :class:`APIError`."""
        try:
            opening = asyncio.gather(*(self._open_one(i) for i in range(len(self.payloads))), return_exceptions=True)
            results = await self._within_limits(opening, idle_limited=False)
        except BaseException:  # timed out or cancelled: close what did open
            await self.aclose()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.aclose()
            raise errors[0]
        for i in range(len(self.payloads)):
            self._tasks.append(asyncio.create_task(self._pump(i)))

    async def _pump(self, i: int) -> None:
        """Relay generation ``i``'s lines. When its stream breaks (transport error, or the end
        without ``done``/``error``) before any ``token`` line, nothing of the generation has
        reached the client (it was queued or being prefilled): it is reopened on
        :attr:`next_client`'s worker, whose ``start`` line is dropped (the client had the first
        one's). Otherwise, or when no other worker takes it, the client gets
        :data:`WORKER_GONE`."""
        started = produced = finished = False
        try:
            while True:
                response = self._responses[i]
                assert response is not None
                try:
                    async for raw in response.aiter_lines():
                        if not raw.strip():
                            continue
                        line = StreamLine.model_validate_json(raw)
                        if line.event == "start" and started:
                            continue
                        started = started or line.event == "start"
                        produced = produced or line.event == "token"
                        await self._queue.put(Item(i, line))
                        if line.event in ("done", "error"):
                            finished = True
                            break
                except (httpx.TransportError, OSError) as exc:
                    log.warning("worker stream %d broke: %s", i, exc)
                except ValueError as exc:  # a garbled line: a fault of that worker, not its death
                    log.warning("worker stream %d sent a bad line: %s", i, exc)
                    return
                if finished or produced or self._closed or not await self._reopen(i):
                    return
        finally:
            if not finished and not self._closed:
                await self._queue.put(Item(i, StreamLine(event="error", error=dict(WORKER_GONE))))
            await self._queue.put(i)

    async def _reopen(self, i: int) -> bool:
        """Open generation ``i`` again on the next worker :attr:`next_client` names, after its
        worker's stream broke; False when there is none left or every one failed to take it."""
        while self.next_client is not None:
            if self._responses[i] is not None:
                await self._responses[i].aclose()
            client = await self.next_client(self._clients[i])
            if client is None:
                return False
            self._clients[i], self._responses[i] = client, None
            try:
                await self._open_one(i)
            except APIError as exc:
                if exc.code != "worker_unavailable":
                    return False
                continue  # not reachable either: the next one
            log.warning("generation %d moved to another worker before its first token", i)
            return True
        return False

    async def lines(self) -> AsyncIterator[Item]:
        """Merged lines of all generations until each has ended (``done`` or ``error``)."""
        remaining = len(self._tasks)
        producing = False  # the idle limit starts with the first token (see the module docstring)
        while remaining:
            item = await self._within_limits(self._queue.get(), idle_limited=producing)
            if isinstance(item, int):
                remaining -= 1
                continue
            producing = producing or item.line.event == "token"
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
