"""The worker's internal HTTP API (FastAPI), served on a Unix socket by :mod:`worker.main`.

Routes (all internal; the service is the only client):

- ``GET /ready``: 200 once the job runner and model registry are up (see :class:`ReadyResponse`),
  with the compute device (:func:`metal_marlin.device.device_info`) and the loaded models'
  scheduler counters (``generation``: throughput, cancellations and how fast they act);
- ``POST /generate``: stream one generation as NDJSON (see :mod:`worker.protocol`);
- ``POST /jobs/wake``: a job was queued, look now instead of at the next poll;
- ``GET /models``: loaded models and the memory budget;
- ``POST /models/{model_id}/unload``: drop a model (e.g. its job was deleted).

When ``MM_WORKER_TOKEN`` is set every request must carry it in ``X-MM-Worker-Token``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from jobstore import JobStore
from worker.generation import LoadedModel, ModelFilesMissing, ModelLoadFailed, ModelNotFound, ModelRegistry, ModelUnavailable
from worker.protocol import (
    NDJSON,
    WORKER_TOKEN_HEADER,
    GenerateRequest,
    LoadedModelInfo,
    LoadedModelsResponse,
    ReadyResponse,
    StreamLine,
    TopLogprob,
)
from worker.runner import JobRunner

log = logging.getLogger("metal_marlin.worker")

_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "logit_bias", "max_tokens", "stop", "stop_token_ids", "logprobs", "ignore_eos",
)


@dataclass
class WorkerState:
    worker_id: str
    store: JobStore
    registry: ModelRegistry
    runner: JobRunner | None
    token: str | None = None
    ready: bool = False
    #: :func:`metal_marlin.device.device_info`, taken once (None: at app creation).
    device_info: dict[str, Any] | None = None


def _error(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


def _line(**fields: Any) -> bytes:
    return (StreamLine(**fields).model_dump_json(exclude_none=True) + "\n").encode()


def _param_of(message: str) -> str | None:
    head = message.split(" ", 1)[0].split("[", 1)[0]
    return head if head in _SAMPLING_FIELDS else None


class WorkerTokenCheck:
    """Pure ASGI middleware (keeps streaming and disconnects untouched): require the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers", ())).get(WORKER_TOKEN_HEADER.lower().encode(), b"")
            if not hmac.compare_digest(given, self.token):
                response = _error(401, "missing or wrong worker token", type="authentication_error", code="invalid_worker_token")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_worker_app(state: WorkerState) -> FastAPI:
    from metal_marlin.assets import BUILTIN_MODEL_NAME
    from metal_marlin.device import on_gpu as device_is_gpu
    from metal_marlin.generate.scheduler import merge_stats

    if state.device_info is None:
        from metal_marlin.device import device_info

        state.device_info = device_info()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.runner is not None:
            state.runner.start()
        if device_is_gpu():
            # On a GPU the first use of each kernel compiles it (tens of seconds): load and
            # warm the built-in model before reporting ready, so no request waits on it.
            entry = await state.registry.acquire(BUILTIN_MODEL_NAME)
            state.registry.release(entry)
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            if state.runner is not None:
                await asyncio.to_thread(state.runner.stop)
            state.registry.close_all()

    app = FastAPI(title="metal-marlin worker (internal)", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = state
    if state.token:
        app.add_middleware(WorkerTokenCheck, token=state.token)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in err.get("loc", ())[1:])
        return _error(400, f"invalid internal request: {loc}: {err.get('msg', 'invalid')}", code="invalid_value", param=loc or None)

    @app.get("/ready", response_model=ReadyResponse)
    async def ready() -> Any:
        runner = state.runner
        if not state.ready or (runner is not None and not runner.alive):
            return _error(503, "the worker is not ready", type="service_unavailable_error", code="worker_not_ready")
        return ReadyResponse(
            status="ready",
            pid=os.getpid(),
            worker_id=state.worker_id,
            jobs_enabled=runner is not None,
            current_job=runner.current_job if runner else None,
            loaded_models=[m.id for m in state.registry.loaded()],
            active_requests=sum(m.active for m in state.registry.loaded()),
            device_info=state.device_info,
            max_batch_size=state.registry.max_batch_size,
            generation=merge_stats(m.scheduler.stats for m in state.registry.loaded()),
            served_models=sorted(state.registry.served),
            free_bytes=max(0, state.registry.budget_bytes - state.registry.used_bytes),
        )

    @app.post("/jobs/wake", status_code=204)
    async def wake() -> Response:
        if state.runner is not None:
            state.runner.wake()
        return Response(status_code=204)

    @app.get("/models", response_model=LoadedModelsResponse)
    async def models() -> Any:
        reg = state.registry
        return LoadedModelsResponse(
            budget_bytes=reg.budget_bytes,
            used_bytes=reg.used_bytes,
            data=[LoadedModelInfo(id=m.id, bytes=m.nbytes, active_requests=m.active, last_used=m.last_used) for m in reg.loaded()],
        )

    @app.post("/models/{model_id}/unload", status_code=204)
    async def unload(model_id: str) -> Response:
        state.registry.unload(model_id)
        return Response(status_code=204)

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> Response:
        if (req.prompt is None) == (req.messages is None):
            return _error(400, "give exactly one of prompt and messages", code="invalid_value")
        reg = state.registry
        try:  # the registry's messages name the model by id only (it logs paths and causes)
            entry = await reg.acquire(req.model)
        except ModelFilesMissing as exc:
            return _error(409, str(exc), type="conflict_error", code="model_files_missing", param="model")
        except ModelNotFound as exc:
            return _error(404, str(exc), type="not_found_error", code="model_not_found", param="model")
        except ModelUnavailable as exc:
            return _error(503, str(exc), type="service_unavailable_error", code="insufficient_memory")
        except ModelLoadFailed as exc:
            return _error(500, str(exc), type="server_error", code="model_load_failed")
        try:
            handle, prompt_ids = await asyncio.to_thread(_submit, entry, req)
        except (ValueError, TypeError) as exc:
            reg.release(entry)
            message = str(exc)
            code = "context_length_exceeded" if "context length" in message else "invalid_value"
            param = "messages" if req.messages is not None and code == "invalid_value" and _param_of(message) is None else _param_of(message)
            return _error(400, message, code=code, param=param)
        except Exception:  # noqa: BLE001 - its text may name server files: logged, not sent
            reg.release(entry)
            log.exception("submit failed")
            return _error(500, "generation could not start (an internal error; the server log has the details)", type="server_error", code="internal_error")
        prompt_text = None
        if req.want_prompt_text:
            prompt_text = req.prompt if isinstance(req.prompt, str) else entry.engine.tokenizer.decode(prompt_ids)
        return StreamingResponse(_stream(entry, handle, prompt_ids, prompt_text, reg), media_type=NDJSON)

    return app


def _submit(entry: LoadedModel, req: GenerateRequest) -> tuple[Any, list[int]]:
    """Encode the prompt and queue it on the model's scheduler (runs in a thread)."""
    from metal_marlin.generate.sampling import SamplingParams

    engine = entry.engine
    if req.messages is not None:
        prompt_ids = engine.encode_chat(req.messages)
    else:
        prompt_ids = engine.encode(req.prompt)
    fields = req.params.model_dump()
    if fields["max_tokens"] is None:  # OpenAI chat default: as many as the context allows
        fields["max_tokens"] = max(0, engine.context_length - len(prompt_ids))
    params = SamplingParams(**fields)
    with engine.lock:  # SamplingState creates an MLX PRNG key
        handle = entry.scheduler.submit(prompt_ids, params)
    return handle, prompt_ids


async def _stream(entry: LoadedModel, handle: Any, prompt_ids: list[int], prompt_text: str | None, reg: ModelRegistry) -> AsyncIterator[bytes]:
    try:
        yield _line(event="start", prompt_tokens=len(prompt_ids), prompt_text=prompt_text)
        async for ev in handle.aevents():
            if ev.token_id is not None:
                token, token_bytes = entry.token_text(ev.token_id)
                top = None
                if ev.top_logprobs is not None:
                    top = []
                    for tid, lp in ev.top_logprobs:
                        t, b = entry.token_text(tid)
                        top.append(TopLogprob(token_id=tid, token=t, bytes=b, logprob=lp))
                yield _line(
                    event="token", text=ev.text, token_id=ev.token_id, token=token, bytes=token_bytes,
                    logprob=ev.logprob, top_logprobs=top,
                )
            elif ev.text:
                yield _line(event="token", text=ev.text)
            if ev.finished:
                usage = {
                    "prompt_tokens": ev.prompt_tokens or len(prompt_ids),
                    "completion_tokens": ev.completion_tokens,
                    "total_tokens": (ev.prompt_tokens or len(prompt_ids)) + ev.completion_tokens,
                }
                if ev.finish_reason == "error":  # ev.error is an exception's text: logged, not sent
                    log.error("generation on model %s failed: %s", entry.id, ev.error)
                    yield _line(event="error", error={"message": "generation failed (an internal error; the server log has the details)", "type": "server_error", "code": "generation_failed"})
                elif ev.finish_reason == "cancelled":
                    yield _line(event="error", error={"message": "generation was cancelled (the worker is shutting down)", "type": "service_unavailable_error", "code": "cancelled"})
                else:
                    yield _line(event="done", finish_reason=ev.finish_reason, stop_reason=ev.stop_reason, usage=usage)
                return
    finally:
        if not handle.finished:
            handle.cancel()
        reg.release(entry)

