"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Streaming responses are Server-Sent Events: ``data: {chunk}\\n\\n`` per chunk, with
``stream_options.include_usage`` a last chunk with ``choices: []`` and the usage, then
``data: [DONE]``. A failure after the stream started is sent as ``data: {"error": {...}}``
and the stream ends (no ``[DONE]``). A client that disconnects cancels its generations.

Limits (settings in :mod:`service.config`):

- at most :meth:`Settings.inflight_limit` requests are admitted at once (decoding or waiting
  for a batch row); past it 429 ``too_many_requests``, ``Retry-After: 1``, and the worker is
  not contacted;
- a request that runs past ``MM_REQUEST_TIMEOUT`` gets 504 ``request_timeout`` (a stream: that
  error as its last event), a stream whose worker sends nothing for ``MM_STREAM_IDLE_TIMEOUT``
  after its first token ends with a ``stream_timeout`` error event; either way the worker's
  generations are cancelled
  (the limits themselves live in :mod:`service.relay`);
- a model whose files are gone from disk (a served model's path deleted after start, a job
  result folder removed) is left out of ``/v1/models`` and answers 409 ``model_files_missing``:
  its id is known (the job still says succeeded), so 404 would misreport it as a typo.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from jobstore import Job, is_job_id
from metal_marlin.assets import BUILTIN_MODELS, builtin_model_installed, builtin_model_path, installed_builtin_models
from service.auth import require_api_key
from service.errors import APIError, error_responses, sse_error
from service.relay import GenerationTimeout, Item, WorkerGenerations
from service.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)
from service.state import ServiceState, get_state

log = logging.getLogger("metal_marlin.service.openai")

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])

OWNER = "metal-marlin"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STREAM_RESPONSE = {"text/event-stream": {"schema": {"type": "string"}, "example": 'data: {"id": "...", "choices": [...]}\n\ndata: [DONE]\n\n'}}


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
def _file_card(model_id: str, locate: Callable[[], Any]) -> ModelCard:
    """A model card dated by its file's mtime (0 when the file is not there)."""
    try:
        created = int(locate().stat().st_mtime)
    except OSError:
        created = 0
    return ModelCard(id=model_id, created=created, owned_by=OWNER)


def _builtin_card(name: str) -> ModelCard:
    return _file_card(name, lambda: builtin_model_path(name))


def _served_card(name: str, path: Any) -> ModelCard:
    return _file_card(name, lambda: path)


def _remote_card(name: str) -> ModelCard:
    """A model that a worker host serves by name (its files are on that host, not here)."""
    return ModelCard(id=name, created=0, owned_by=OWNER)


def _job_card(job: Job) -> ModelCard:
    return ModelCard(id=job.id, created=int(job.finished_at or job.created_at), owned_by=OWNER)


def _job_files_present(state: ServiceState, job: Job) -> bool:
    """Whether a succeeded job's result is still in the result store (what the worker loads,
    and the result download's default file)."""
    return state.results.holds_weights(job.id)


def _known_models(state: ServiceState) -> list[ModelCard]:
    """The built-in models whose packages are installed (the default first), the operator's
    served models (``--model``), then succeeded jobs; models whose files are gone are left
    out (they cannot be used)."""
    cards = [_builtin_card(name) for name in installed_builtin_models()]
    cards += [_served_card(name, path) for name, path in state.settings.served_models.items() if path.exists()]
    cards += [_remote_card(name) for name in sorted(state.supervisor.served_models() - set(state.settings.served_models))]
    published = state.results.published()  # one listing, not a probe per job
    cards += [_job_card(job) for job in state.store.succeeded_jobs() if job.id in published]
    return cards


def _model_card(state: ServiceState, model_id: str) -> ModelCard:
    """The card of a model requests may name; 404 (param ``model``) for any other id, 409
    ``model_files_missing`` for a known one whose files were removed from disk."""
    if model_id in BUILTIN_MODELS:
        if not builtin_model_installed(model_id):
            raise APIError(404, f"the model {model_id!r} is not installed on this server", param="model", code="model_not_found")
        return _builtin_card(model_id)
    served = state.settings.served_models.get(model_id)
    if served is None and model_id in state.supervisor.served_models():  # a worker host serves it: its files are there
        return _remote_card(model_id)
    if served is not None:
        card, present, where = _served_card(model_id, served), served.exists(), served
    else:
        job = state.store.get(model_id) if is_job_id(model_id) else None
        if job is None or job.status != "succeeded":
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        card, present, where = _job_card(job), _job_files_present(state, job), state.results.location
    if not present:  # the path is for the operator's log, never for the client
        log.warning("model %s cannot be used: its files are gone from %s", model_id, where)
        raise APIError(409, f"the files of model {model_id!r} are no longer on the server; it cannot be used", param="model", code="model_files_missing")
    return card


@router.get("/models", response_model=ModelList, summary="List models", responses=error_responses(401))
def list_models(request: Request) -> ModelList:
    return ModelList(data=_known_models(get_state(request)))


@router.get("/models/{model_id}", response_model=ModelCard, summary="Get a model", responses=error_responses(401, 404, 409))
def get_model(request: Request, model_id: str = Path(max_length=256)) -> ModelCard:
    return _model_card(get_state(request), model_id)


# ---------------------------------------------------------------------------------------
# Shared request handling
# ---------------------------------------------------------------------------------------
def _sampling(body: SamplingFields, *, max_tokens: int | None, logprobs: int | None, seed_offset: int) -> dict[str, Any]:
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias", code="invalid_value") from None
        if token < 0:
            raise APIError(400, f"logit_bias keys must be token ids >= 0, got {key!r}", param="logit_bias", code="invalid_value")
        bias[token] = value
    stop = body.stop if isinstance(body.stop, list) else ([body.stop] if body.stop else [])
    seed = body.seed + seed_offset if body.seed is not None else None
    return {
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "top_k": 0 if body.top_k in (None, -1) else body.top_k,
        "min_p": body.min_p or 0.0,
        "seed": seed,
        "repetition_penalty": body.repetition_penalty or 1.0,
        "presence_penalty": body.presence_penalty or 0.0,
        "frequency_penalty": body.frequency_penalty or 0.0,
        "logit_bias": bias,
        "max_tokens": max_tokens,
        "stop": stop,
        "stop_token_ids": list(body.stop_token_ids or []),
        "logprobs": logprobs,
        "ignore_eos": bool(body.ignore_eos),
    }


def _admit(state: ServiceState, endpoint: str) -> None:
    """Refuse a request the worker cannot take now (503) or that is over the in-flight limit
    (429). The count it checks is raised by :meth:`GenerationRun.open` with no ``await`` in
    between, so concurrent requests cannot all pass the check at once, and lowered only when
    the run is closed: it covers requests decoding and those waiting for a batch row."""
    if not state.supervisor.ready:
        state.metrics.generations.inc(endpoint=endpoint, outcome="unavailable")
        raise APIError(503, "the worker is not ready yet; retry shortly", code="worker_unavailable", headers={"Retry-After": "5"})
    limit = state.settings.inflight_limit(state.supervisor.ready_info.get("max_batch_size"))
    if state.inflight >= limit:
        state.metrics.rejected.inc(reason="too_many_requests")
        state.metrics.generations.inc(endpoint=endpoint, outcome="rejected")
        raise APIError(429, f"too many requests in flight (limit {limit}); retry shortly", code="too_many_requests", headers={"Retry-After": "1"})


#: Refusals after which a request tries the next worker (it has not started on this one).
MOVE_ON = frozenset({"worker_unavailable", "worker_not_ready", "insufficient_memory"})


@dataclass
class ChoiceState:
    index: int
    prompt_group: int
    parts: list[str] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)  # token lines (for logprobs)
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    prompt_text: str | None = None


class GenerationRun:
    """One client request's generations: admission, metrics, usage accounting."""

    def __init__(self, state: ServiceState, endpoint: str, model: str, payloads: list[dict[str, Any]], n: int, *, stream: bool) -> None:
        self.state = state
        self.endpoint = endpoint
        self.model = model
        self.payloads = payloads
        self.idle_timeout_s = state.settings.stream_idle_timeout_s if stream else None  # a JSON answer has no stream to keep alive
        self.relay: WorkerGenerations | None = None
        self.worker: Any = None  # where the generations run (service.workers.RemoteWorker, or the supervisor)
        self.moved_to: list[Any] = []  # workers that took over a generation (see _next_client)
        self.choices = [ChoiceState(i, i // n) for i in range(len(payloads))]
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.error: dict[str, Any] | None = None
        self._counted = False

    async def open(self) -> None:
        self.state.inflight += 1
        self.state.metrics.inflight.set(self.state.inflight)
        try:
            await self._open_on_a_worker()
        except BaseException as exc:
            self._finish("timeout" if isinstance(exc, GenerationTimeout) else "error")
            raise

    async def _open_on_a_worker(self) -> None:
        """Open the generations on the best worker for the model (:meth:`WorkerPool.candidates`);
        a worker that cannot be reached (or is not ready) is marked down and the request, not
        started anywhere yet, moves to the next one; so does one that a full worker refuses."""
        workers = self.state.supervisor.candidates(self.model)
        if not workers:
            raise APIError(503, "no worker is ready; retry shortly", code="worker_unavailable", headers={"Retry-After": "5"})
        for n, worker in enumerate(workers):
            relay = WorkerGenerations(
                worker.client, self.payloads, timeout_s=self.state.settings.request_timeout_s, idle_timeout_s=self.idle_timeout_s, next_client=self._next_client
            )
            worker.inflight += 1
            try:
                await relay.open()
            except APIError as exc:
                worker.inflight -= 1
                if exc.code not in MOVE_ON or n == len(workers) - 1:
                    raise
                if exc.code != "insufficient_memory":  # that one is alive, only full
                    self.state.supervisor.mark_down(worker, exc.message)
                continue
            except BaseException:
                worker.inflight -= 1
                raise
            self.relay, self.worker = relay, worker
            return

    async def _next_client(self, failed: Any) -> Any:
        """For the relay: a generation's worker (the one whose client is ``failed``) died before
        the generation produced a token, so it moves. That worker is marked down (the pool's
        probes bring it back if it returns) and the best other candidate for the model takes
        it; None when there is none (a single supervised worker: the client gets the error)."""
        pool = self.state.supervisor
        for worker in pool.candidates(self.model):
            if worker.client is failed:
                pool.mark_down(worker, "its generation stream broke")
        for worker in pool.candidates(self.model):
            if worker.client is not failed:
                worker.inflight += 1
                self.moved_to.append(worker)
                return worker.client
        return None

    def account(self, item: Item) -> None:
        choice, line = self.choices[item.index], item.line
        if line.event == "start":
            choice.prompt_tokens = line.prompt_tokens or 0
            choice.prompt_text = line.prompt_text
        elif line.event == "token":
            if line.token_id is not None:
                choice.completion_tokens += 1
                if line.logprob is not None:
                    choice.tokens.append(_token_dict(line))
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                    self.state.metrics.ttft.observe(self.first_token_at - self.started, endpoint=self.endpoint)
            if line.text:
                choice.parts.append(line.text)
        elif line.event == "done":
            choice.finish_reason = line.finish_reason if line.finish_reason in ("stop", "length") else "stop"
            if line.usage:
                choice.completion_tokens = line.usage.get("completion_tokens", choice.completion_tokens)
        elif line.event == "error" and self.error is None:
            self.error = line.error or {"message": "generation failed", "type": "server_error"}

    def usage(self) -> dict[str, int]:
        prompt: dict[int, int] = {}
        for c in self.choices:
            prompt[c.prompt_group] = c.prompt_tokens
        p = sum(prompt.values())
        c = sum(ch.completion_tokens for ch in self.choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _finish(self, outcome: str) -> None:
        if self._counted:
            return
        self._counted = True
        for worker in [self.worker, *self.moved_to]:
            if worker is not None:
                worker.inflight -= 1
        self.state.inflight -= 1
        self.state.metrics.inflight.set(self.state.inflight)
        self.state.metrics.generations.inc(endpoint=self.endpoint, outcome=outcome)
        usage = self.usage()
        self.state.metrics.prompt_tokens.inc(usage["prompt_tokens"], model=self.model)
        self.state.metrics.completion_tokens.inc(usage["completion_tokens"], model=self.model)

    async def close(self, outcome: str) -> None:
        # Shielded: this runs while a disconnected client's task is being cancelled, and the
        # worker streams must really be closed so the worker stops generating.
        with anyio.CancelScope(shield=True):
            try:
                if self.relay is not None:
                    await self.relay.aclose()
            finally:
                self._finish(outcome)

    async def collect(self, request: Request) -> None:
        """Consume every line (non-streaming), cancelling if the client disconnects."""

        async def consume() -> None:
            async for item in self.relay.lines():
                self.account(item)

        task = asyncio.create_task(consume())
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if not done and await request.is_disconnected():
                    raise APIError(499, "client disconnected", code="client_closed_request")
            task.result()
        except BaseException as exc:
            task.cancel()
            await self.close("timeout" if isinstance(exc, GenerationTimeout) else ("error" if self.error is not None else "cancelled"))
            raise
        outcome = "error" if self.error is not None else "ok"
        await self.close(outcome)
        if self.error is not None:
            err = self.error
            status = 503 if err.get("code") in ("worker_unavailable", "cancelled") else 500
            raise APIError(status, err.get("message", "generation failed"), type=err.get("type"), code=err.get("code"))

    def sse(self, make_chunks: Callable[[Item, ChoiceState], list[dict[str, Any]]], include_usage: bool, usage_chunk: Callable[[dict[str, int]], dict[str, Any]], prelude: list[dict[str, Any]]) -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            outcome = "cancelled"
            try:
                for chunk in prelude:
                    yield _sse(chunk)
                async for item in self.relay.lines():
                    self.account(item)
                    if item.line.event == "error":
                        err = item.line.error or {}
                        outcome = "error"
                        yield sse_error(err.get("message", "generation failed"), err.get("type", "server_error"), err.get("code"))
                        return
                    for chunk in make_chunks(item, self.choices[item.index]):
                        yield _sse(chunk)
                if include_usage:
                    yield _sse(usage_chunk(self.usage()))
                yield b"data: [DONE]\n\n"
                outcome = "ok"
            except GenerationTimeout as exc:
                outcome = "timeout"
                yield sse_error(exc.message, exc.type, exc.code)
            finally:
                await self.close(outcome)

        return RunStreamingResponse(self, stream())


class RunStreamingResponse(StreamingResponse):
    """The SSE response of a :class:`GenerationRun`, which it closes however the response ends.

    The body's own ``finally`` is not enough: when the client has left before the response
    starts, Starlette cancels the sender before it first pulls from the body, so that
    ``finally`` never runs, and the run would keep its admission slot while the worker
    generates for nobody. Closing twice is harmless (the first outcome is the one counted).
    """

    def __init__(self, run: GenerationRun, body: AsyncIterator[bytes]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.run.close("cancelled")


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _check_prompt_count(state: ServiceState, count: int) -> None:
    if count > state.settings.max_prompts:
        raise APIError(400, f"this request asks for {count} generations (prompts x n); the limit is {state.settings.max_prompts}", param="n", code="too_many_generations")


# ---------------------------------------------------------------------------------------
# Completions
# ---------------------------------------------------------------------------------------
def _completion_logprobs(lines: list[dict[str, Any]], offset0: int) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = offset0
    for t in lines:
        tokens.append(t["token"])
        token_lps.append(t["logprob"])
        tops.append({x["token"]: x["logprob"] for x in t.get("top_logprobs") or []})
        offsets.append(offset)
        offset += len(t.get("text") or "")
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _token_dict(line: Any) -> dict[str, Any]:
    return {
        "token": line.token or "",
        "logprob": line.logprob,
        "bytes": line.bytes,
        "text": line.text or "",
        "top_logprobs": [t.model_dump() for t in line.top_logprobs or []],
    }


@router.post(
    "/completions",
    response_model=Completion,
    summary="Create a completion",
    responses={200: {"content": STREAM_RESPONSE, "description": "JSON, or SSE chunks when stream is true"}, **error_responses(400, 401, 404, 409, 413, 429, 500, 503, 504)},
)
async def create_completion(body: CompletionRequest, request: Request) -> Any:
    state = get_state(request)
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (prompt logprobs are not computed)", param="echo", code="unsupported_parameter")
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], (str, list)):
        prompts = list(prompt)
    else:
        prompts = [prompt]
    n = body.n or 1
    _check_prompt_count(state, len(prompts) * n)
    await run_in_threadpool(_model_card, state, body.model)
    _admit(state, "completions")

    payloads = []
    for p in prompts:
        for j in range(n):
            payloads.append({
                "model": body.model,
                "prompt": p,
                "params": _sampling(body, max_tokens=body.max_tokens, logprobs=body.logprobs, seed_offset=j),
                "want_prompt_text": bool(body.echo),
            })
    run = GenerationRun(state, "completions", body.model, payloads, n, stream=bool(body.stream))
    await run.open()
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    want_lp = body.logprobs is not None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        echo_sent: set[int] = set()
        offsets: dict[int, int] = {}

        def chunk(choice: dict[str, Any]) -> dict[str, Any]:
            out = {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        def make_chunks(item: Item, ch: ChoiceState) -> list[dict[str, Any]]:
            line = item.line
            out = []
            if line.event == "start":
                if body.echo and ch.prompt_text:
                    echo_sent.add(ch.index)
                    offsets[ch.index] = len(ch.prompt_text)
                    out.append(chunk({"index": ch.index, "text": ch.prompt_text, "logprobs": None, "finish_reason": None}))
            elif line.event == "token" and (line.text or want_lp):
                lp = None
                if want_lp and line.token_id is not None:
                    lp = _completion_logprobs([_token_dict(line)], offsets.get(ch.index, 0))
                offsets[ch.index] = offsets.get(ch.index, 0) + len(line.text or "")
                out.append(chunk({"index": ch.index, "text": line.text or "", "logprobs": lp, "finish_reason": None}))
            elif line.event == "done":
                out.append(chunk({"index": ch.index, "text": "", "logprobs": None, "finish_reason": ch.finish_reason}))
            return out

        def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": [], "usage": usage}

        return run.sse(make_chunks, include_usage, usage_chunk, [])

    await run.collect(request)
    choices = []
    for ch in run.choices:
        text = "".join(ch.parts)
        prefix = ch.prompt_text if body.echo and ch.prompt_text else ""
        lp = None
        if want_lp:
            lp = _completion_logprobs(ch.tokens, len(prefix))
        choices.append({"index": ch.index, "text": prefix + text, "logprobs": lp, "finish_reason": ch.finish_reason})
    return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": choices, "usage": run.usage(), "system_fingerprint": None})


# ---------------------------------------------------------------------------------------
# Chat completions
# ---------------------------------------------------------------------------------------
def _chat_logprob(line_token: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": line_token["token"],
        "logprob": line_token["logprob"],
        "bytes": line_token["bytes"],
        "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]} for t in line_token["top_logprobs"]],
    }


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    summary="Create a chat completion",
    responses={200: {"content": STREAM_RESPONSE, "description": "JSON, or SSE chunks when stream is true"}, **error_responses(400, 401, 404, 409, 413, 429, 500, 503, 504)},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
    state = get_state(request)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs", code="invalid_value")
    n = body.n or 1
    _check_prompt_count(state, n)
    await run_in_threadpool(_model_card, state, body.model)
    _admit(state, "chat.completions")

    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    payloads = [
        {"model": body.model, "messages": messages, "params": _sampling(body, max_tokens=max_tokens, logprobs=logprobs, seed_offset=j)}
        for j in range(n)
    ]
    run = GenerationRun(state, "chat.completions", body.model, payloads, n, stream=bool(body.stream))
    await run.open()
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    want_lp = logprobs is not None

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choice: dict[str, Any]) -> dict[str, Any]:
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model, "system_fingerprint": None, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        prelude = [chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}) for i in range(n)]

        def make_chunks(item: Item, ch: ChoiceState) -> list[dict[str, Any]]:
            line = item.line
            if line.event == "token" and (line.text or (want_lp and line.token_id is not None)):
                lp = {"content": [_chat_logprob(_token_dict(line))]} if want_lp and line.token_id is not None else None
                return [chunk({"index": ch.index, "delta": {"content": line.text or ""}, "logprobs": lp, "finish_reason": None})]
            if line.event == "done":
                return [chunk({"index": ch.index, "delta": {}, "logprobs": None, "finish_reason": ch.finish_reason})]
            return []

        def usage_chunk(usage: dict[str, int]) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model, "system_fingerprint": None, "choices": [], "usage": usage}

        return run.sse(make_chunks, include_usage, usage_chunk, prelude)

    await run.collect(request)
    choices = []
    for ch in run.choices:
        lp = {"content": [_chat_logprob(t) for t in ch.tokens]} if want_lp else None
        choices.append({
            "index": ch.index,
            "message": {"role": "assistant", "content": "".join(ch.parts)},
            "logprobs": lp,
            "finish_reason": ch.finish_reason,
        })
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": body.model, "choices": choices, "usage": run.usage(), "system_fingerprint": None})
