"""Limits on generation requests: in-flight bound, time limits, error bodies, vanished models.

The service app runs in-process behind httpx's ASGI transport. Its worker is a scripted fake
(:class:`FakeWorker`, which records every request and whether each stream was closed), or the
real worker app where the worker's own error messages are under test. Time limits are set to
fractions of a second, so every test stays fast.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import ClientDisconnect

from jobstore import open_store
from metal_marlin.assets import installed_builtin_models
from service.app import create_app
from service.config import Settings
from service.state import ServiceState

KEY = "limits-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BUILTIN = "smollm2-135m-instruct"
COMPLETION = {"model": BUILTIN, "prompt": "Hi", "max_tokens": 4}
CHAT = {"model": BUILTIN, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
START = {"event": "start", "prompt_tokens": 2}
TOKEN = {"event": "token", "text": "Hi", "token_id": 7}
DONE = {"event": "done", "finish_reason": "stop", "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}


class FakeStream(httpx.AsyncByteStream):
    """One ``/generate`` body: ``lines`` as NDJSON, ``gap_s`` apart; after the first line it
    waits for ``gate`` (if any); with ``hang`` it then sends nothing ever again."""

    def __init__(self, lines: list[dict[str, Any]], gap_s: float, hang: bool, gate: asyncio.Event | None) -> None:
        self.lines, self.gap_s, self.hang, self.gate = lines, gap_s, hang, gate
        self.closed = False

    async def __aiter__(self):  # type: ignore[override]
        for i, line in enumerate(self.lines):
            if i == 1 and self.gate is not None:
                await self.gate.wait()
            if i and self.gap_s:
                await asyncio.sleep(self.gap_s)
            yield (json.dumps(line) + "\n").encode()
        if self.hang:
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


class FakeWorker(httpx.AsyncBaseTransport):
    """The worker's ``/generate``, scripted: the same stream for every request, or an error answer."""

    def __init__(
        self,
        lines: list[dict[str, Any]] | None = None,
        *,
        gap_s: float = 0.0,
        hang: bool = False,
        header_delay_s: float = 0.0,
        error: tuple[int, dict[str, Any]] | None = None,
    ) -> None:
        self.lines = [START, TOKEN, DONE] if lines is None else lines
        self.gap_s, self.hang, self.header_delay_s, self.error = gap_s, hang, header_delay_s, error
        self.gate: asyncio.Event | None = None
        self.requests: list[dict[str, Any]] = []
        self.streams: list[FakeStream] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/generate", request.url
        self.requests.append(json.loads(await request.aread()))
        if self.header_delay_s:
            await asyncio.sleep(self.header_delay_s)
        if self.error is not None:
            return httpx.Response(self.error[0], json=self.error[1])
        stream = FakeStream(self.lines, self.gap_s, self.hang, self.gate)
        self.streams.append(stream)
        return httpx.Response(200, stream=stream, headers={"Content-Type": "application/x-ndjson"})


def make_service(tmp_path: Path, worker: httpx.AsyncBaseTransport, **settings: Any) -> FastAPI:
    """The service app with a ready worker behind ``worker`` (no process is started)."""
    app = create_app(Settings(data_dir=tmp_path / "data", api_key=KEY, **settings), start_worker=False)
    sup = app.state.mm.supervisor
    sup.ready, sup.ready_info = True, {"pid": 1, "max_batch_size": 16}
    sup.client = httpx.AsyncClient(transport=worker, base_url="http://worker")
    return app


def drive(app: FastAPI, scenario: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service", headers=AUTH, timeout=10) as client:
            await scenario(client)
        await app.state.mm.supervisor.client.aclose()

    try:
        asyncio.run(main())
    finally:
        app.state.mm.store.close()


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def state_of(app: FastAPI) -> ServiceState:
    return app.state.mm


def assert_error(resp: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["code"] == code and err["param"] == param and isinstance(err["message"], str) and err["message"], body
    return err


def sse_events(text: str) -> list[Any]:
    return [json.loads(p[len("data: "):]) if p != "data: [DONE]" else "[DONE]" for p in text.split("\n\n") if p.strip()]


# ---------------------------------------------------------------------------------------
# 1. In-flight bound: 429 with Retry-After, the worker never sees the rejected request
# ---------------------------------------------------------------------------------------
def test_requests_over_the_inflight_limit_get_429_and_never_reach_the_worker(tmp_path: Path) -> None:
    worker = FakeWorker()
    app = make_service(tmp_path, worker, max_inflight=2)
    state = state_of(app)

    async def scenario(c: httpx.AsyncClient) -> None:
        worker.gate = asyncio.Event()  # the two admitted requests start, then wait
        held = [
            asyncio.create_task(c.post("/v1/completions", json=COMPLETION)),
            asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT, "stream": True})),
        ]
        await until(lambda: len(worker.streams) == 2)
        assert state.inflight == 2
        for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", {**CHAT, "stream": True})):
            resp = await c.post(path, json=body)
            err = assert_error(resp, 429, "too_many_requests")
            assert err["type"] == "rate_limit_error" and "limit 2" in err["message"]
            assert resp.headers["Retry-After"] == "1"
        assert len(worker.requests) == 2 and state.inflight == 2  # the rejected ones reached no worker

        worker.gate.set()
        done = await asyncio.gather(*held)
        assert done[0].status_code == 200 and done[0].json()["choices"][0]["text"] == "Hi"
        assert done[1].status_code == 200 and sse_events(done[1].text)[-1] == "[DONE]"
        assert state.inflight == 0  # finished requests give their slots back
        assert (await c.post("/v1/completions", json=COMPLETION)).status_code == 200
        assert len(worker.requests) == 3

    drive(app, scenario)


def test_a_client_gone_before_its_stream_starts_frees_its_slot(tmp_path: Path) -> None:
    """Under ASGI 2.4 a server's ``send`` raises OSError once the client is gone, and Starlette
    then never starts the response body: the run must still be closed (its slot freed, its
    worker stream closed)."""
    worker = FakeWorker([START, TOKEN], hang=True)
    app = make_service(tmp_path, worker, max_inflight=1, request_timeout_s=5)  # 5: a bound on a failing test
    body = json.dumps({**CHAT, "stream": True}).encode()

    async def scenario(c: httpx.AsyncClient) -> None:
        inbox = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return inbox.pop(0) if inbox else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            raise OSError("the client is gone")

        headers = [(b"host", b"service"), (b"authorization", AUTH["Authorization"].encode()), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 5000), "server": ("service", 80),
        }
        with pytest.raises((OSError, ClientDisconnect)):  # what the server sees: the app could not answer
            await asyncio.wait_for(app(scope, receive, send), 5)
        assert len(worker.streams) == 1 and worker.streams[0].closed
        assert state_of(app).inflight == 0
        worker.lines, worker.hang = [START, TOKEN, DONE], False
        assert (await c.post("/v1/completions", json=COMPLETION)).status_code == 200  # the slot is free again

    drive(app, scenario)


# ---------------------------------------------------------------------------------------
# 2. Time limits: 504 request_timeout, stream_timeout / request_timeout SSE events
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "worker",
    [
        pytest.param(lambda: FakeWorker([START] + [TOKEN] * 100 + [DONE], gap_s=0.05), id="slow-generation"),
        pytest.param(lambda: FakeWorker(header_delay_s=30), id="worker-never-answers"),
    ],
)
def test_a_non_streaming_request_past_the_request_timeout_is_504_and_cancelled(tmp_path: Path, worker: Callable[[], FakeWorker]) -> None:
    fake = worker()
    app = make_service(tmp_path, fake, request_timeout_s=0.3, stream_idle_timeout_s=0.1)  # idle does not apply to JSON answers

    async def scenario(c: httpx.AsyncClient) -> None:
        started = time.monotonic()
        resp = await c.post("/v1/completions", json=COMPLETION)
        elapsed = time.monotonic() - started
        err = assert_error(resp, 504, "request_timeout")
        assert err["type"] == "server_error" and "0.3 s" in err["message"] and 0.3 <= elapsed < 3, elapsed
        assert len(fake.requests) == 1 and all(s.closed for s in fake.streams)  # the worker stream was closed
        assert state_of(app).inflight == 0

    drive(app, scenario)


def test_a_stream_whose_worker_goes_quiet_ends_with_stream_timeout(tmp_path: Path) -> None:
    worker = FakeWorker([START, TOKEN], hang=True)
    app = make_service(tmp_path, worker, request_timeout_s=30, stream_idle_timeout_s=0.2)

    async def scenario(c: httpx.AsyncClient) -> None:
        started = time.monotonic()
        resp = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        assert time.monotonic() - started < 5
        events = sse_events(resp.text)
        assert [e["choices"][0]["delta"] for e in events[:-1]] == [{"role": "assistant", "content": ""}, {"content": "Hi"}]
        assert events[-1] == {"error": {"message": events[-1]["error"]["message"], "type": "server_error", "param": None, "code": "stream_timeout"}}
        assert "0.2 s" in events[-1]["error"]["message"] and "[DONE]" not in events
        assert len(worker.streams) == 1 and worker.streams[0].closed
        assert state_of(app).inflight == 0

    drive(app, scenario)


def test_a_stream_waiting_for_its_first_token_is_bounded_by_the_request_timeout_only(tmp_path: Path) -> None:
    """A request queued for a batch row (or in prefill) gets no line after ``start``: that is
    not a stalled stream."""
    worker = FakeWorker()
    app = make_service(tmp_path, worker, request_timeout_s=5, stream_idle_timeout_s=0.1)

    async def scenario(c: httpx.AsyncClient) -> None:
        worker.gate = asyncio.Event()
        asyncio.get_running_loop().call_later(0.4, worker.gate.set)  # four idle limits after start
        resp = await c.post("/v1/completions", json={**COMPLETION, "stream": True})
        events = sse_events(resp.text)
        assert resp.status_code == 200 and events[0]["choices"][0]["text"] == "Hi" and events[-1] == "[DONE]", events
        assert state_of(app).inflight == 0

    drive(app, scenario)


def test_a_stream_that_never_goes_quiet_is_still_bounded_by_the_request_timeout(tmp_path: Path) -> None:
    worker = FakeWorker([START] + [TOKEN] * 200 + [DONE], gap_s=0.05)
    app = make_service(tmp_path, worker, request_timeout_s=0.5, stream_idle_timeout_s=2.0)  # idle: far from the 0.05 s gaps

    async def scenario(c: httpx.AsyncClient) -> None:
        resp = await c.post("/v1/completions", json={**COMPLETION, "stream": True})
        events = sse_events(resp.text)
        assert resp.status_code == 200 and len(events) > 2 and events[0]["choices"][0]["text"] == "Hi"
        assert events[-1]["error"]["code"] == "request_timeout" and "[DONE]" not in events
        assert worker.streams[0].closed and state_of(app).inflight == 0

    drive(app, scenario)


def test_timeout_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings().request_timeout_s, Settings().stream_idle_timeout_s) == (300.0, 60.0)
    monkeypatch.setenv("MM_REQUEST_TIMEOUT", "12.5")
    monkeypatch.setenv("MM_STREAM_IDLE_TIMEOUT", "3")
    settings = Settings.from_env()
    assert (settings.request_timeout_s, settings.stream_idle_timeout_s) == (12.5, 3.0)
    for value, message in (("0", "stream_idle_timeout_s must be > 0"), ("soon", "MM_STREAM_IDLE_TIMEOUT must be a number")):
        monkeypatch.setenv("MM_STREAM_IDLE_TIMEOUT", value)
        with pytest.raises(ValueError, match=message):
            Settings.from_env()


# ---------------------------------------------------------------------------------------
# 3. Error bodies name models by id: no server path, no traceback
# ---------------------------------------------------------------------------------------
def _tiny_model_folder(folder: Path, weights: bytes | None) -> Path:
    folder.mkdir(parents=True)
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
              "num_hidden_layers": 1, "vocab_size": 100, "rms_norm_eps": 1e-5, "head_dim": 16}
    (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_a_model_that_fails_to_load_is_named_by_id_without_paths(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from worker.app import WorkerState, create_worker_app
    from worker.generation import MIB, ModelRegistry

    folder = _tiny_model_folder(tmp_path / "models" / "broken", b"this is not a safetensors file")
    data = tmp_path / "data"
    store = open_store(data)
    registry = ModelRegistry(data, store, 256 * MIB, served={"broken": folder})
    worker_app = create_worker_app(WorkerState(worker_id="w-test", store=store, registry=registry, runner=None))
    app = make_service(tmp_path, httpx.ASGITransport(app=worker_app), served_models=[f"broken={folder}"])

    async def scenario(c: httpx.AsyncClient) -> None:
        for path, body in (("/v1/completions", {**COMPLETION, "model": "broken"}), ("/v1/chat/completions", {**CHAT, "model": "broken", "stream": True})):
            resp = await c.post(path, json=body)
            err = assert_error(resp, 500, "model_load_failed")
            assert "'broken'" in err["message"] and "/" not in err["message"], err
            for leak in (str(tmp_path), str(data), "/" + tmp_path.parts[1], "Traceback", "safetensors"):
                assert leak not in resp.text, (leak, resp.text)
        assert registry.loaded() == [] and state_of(app).inflight == 0

    with caplog.at_level("WARNING", logger="metal_marlin.worker"):
        drive(app, scenario)
    store.close()
    assert str(folder) in caplog.text  # the path went to the server's log instead


# ---------------------------------------------------------------------------------------
# 4. Models whose files vanished: 409 model_files_missing, left out of /v1/models
# ---------------------------------------------------------------------------------------
def _assert_files_missing(c_resp: httpx.Response, model: str, tmp_path: Path) -> None:
    err = assert_error(c_resp, 409, "model_files_missing", "model")
    assert err["type"] == "conflict_error" and repr(model) in err["message"]
    assert str(tmp_path) not in c_resp.text and not re.search(r"/\w", err["message"]), err


def test_a_served_model_whose_path_was_deleted_is_409_and_unlisted(tmp_path: Path) -> None:
    folder = _tiny_model_folder(tmp_path / "models" / "gone", b"\0" * 8)
    worker = FakeWorker()
    app = make_service(tmp_path, worker, served_models=[f"gone={folder}"])  # checked at start: it exists

    async def scenario(c: httpx.AsyncClient) -> None:
        assert "gone" in [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        shutil.rmtree(folder)
        assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == installed_builtin_models()
        _assert_files_missing(await c.get("/v1/models/gone"), "gone", tmp_path)
        _assert_files_missing(await c.post("/v1/completions", json={**COMPLETION, "model": "gone"}), "gone", tmp_path)
        _assert_files_missing(await c.post("/v1/chat/completions", json={**CHAT, "model": "gone", "stream": True}), "gone", tmp_path)
        assert worker.requests == [] and state_of(app).inflight == 0  # refused before reaching the worker
        assert_error(await c.post("/v1/completions", json={**COMPLETION, "model": "never-registered"}), 404, "model_not_found", "model")

    drive(app, scenario)


def test_a_succeeded_job_whose_result_was_removed_is_409_and_unlisted(tmp_path: Path) -> None:
    worker = FakeWorker()
    app = make_service(tmp_path, worker)
    store = state_of(app).store
    job, _ = store.create_job({"model": {"source": "builtin"}})
    store.claim("w-test")
    folder = tmp_path / "data" / "jobs" / job.id
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    store.finish(job.id, "w-test", "succeeded", message="ok")

    async def scenario(c: httpx.AsyncClient) -> None:
        assert job.id in [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        shutil.rmtree(folder)
        assert job.id not in [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
        assert store.get(job.id).status == "succeeded"  # the id is known: not a 404
        _assert_files_missing(await c.get(f"/v1/models/{job.id}"), job.id, tmp_path)
        _assert_files_missing(await c.post("/v1/completions", json={**COMPLETION, "model": job.id}), job.id, tmp_path)
        _assert_files_missing(await c.post("/v1/chat/completions", json={**CHAT, "model": job.id}), job.id, tmp_path)
        assert worker.requests == [] and not folder.exists() and state_of(app).inflight == 0

    drive(app, scenario)


def test_the_workers_files_missing_answer_reaches_the_client_as_409(tmp_path: Path) -> None:
    """Files removed between the service's check and the worker's load: the worker's 409 is relayed."""
    error = {"error": {"message": "the files of model 'smollm2-135m-instruct' are no longer on the server; it cannot be used",
                       "type": "conflict_error", "param": "model", "code": "model_files_missing"}}
    worker = FakeWorker(error=(409, error))
    app = make_service(tmp_path, worker)

    async def scenario(c: httpx.AsyncClient) -> None:
        resp = await c.post("/v1/completions", json=COMPLETION)
        assert resp.status_code == 409 and resp.json() == error
        assert len(worker.requests) == 1 and state_of(app).inflight == 0

    drive(app, scenario)
