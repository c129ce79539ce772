"""End to end: a real uvicorn service in a subprocess with its real worker, driven by httpx
and by the official ``openai`` client.

One tiny quantization job (``n_samples=2, seq_len=32, n_grid=2``, about a minute here) is
shared by the whole module. It is submitted while the server runs without a job runner,
survives a service restart queued, and then runs while the generation tests go on. Later
tests use its result, cancel a second job mid-run, SIGKILL the worker during a third job
and an in-flight stream, restart the service, and finally delete the job.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _net import free_port
from jobstore.layout import verify_result

openai = pytest.importorskip("openai")


def _load_smoke() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("mm_smoke", Path(__file__).resolve().parent.parent / "scripts" / "smoke.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smoke = _load_smoke()

KEY = "e2e-secret"
BUILTIN = "smollm2-135m-instruct"
TINY = {"n_samples": 2, "seq_len": 32, "n_grid": 2}
JOB_TIMEOUT_S = 240
UPLOAD_LIMIT = 128 << 20  # the built-in GGUF is 98 MB


class Server:
    """``python -m service`` on a free loopback port; restartable on the same data dir."""

    def __init__(self, data_dir: Path, roots: Path, log_path: Path, extra_args: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.roots = roots
        self.log_path = log_path
        self.extra_args = list(extra_args or [])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        self.shared_job: str | None = None

    def start(self, jobs: bool = True) -> None:
        env = dict(os.environ)
        env.update({
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MM_WORKER_THREADS": "1",
            "MM_MAX_QUEUED_JOBS": "2", "MM_MAX_INFLIGHT": "3", "MM_WORKER_MEMORY_MB": "2048",
            "MM_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        })
        cmd = [sys.executable, "-m", "service", "--port", str(self.port), "--data-dir", str(self.data_dir),
               "--api-key", KEY, "--model-roots", str(self.roots), "--log-level", "warning", *self.extra_args]
        if not jobs:
            cmd.append("--no-jobs")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.wait_healthy(60)

    def wait_healthy(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            try:
                resp = httpx.get(f"{self.url}/health", timeout=2)
                if resp.status_code == 200:
                    return resp.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"service not healthy within {timeout_s} s\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, jobs: bool = True) -> None:
        self.stop()
        self.start(jobs)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- helpers -------------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/v1/quantization/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def wait_job(self, job_id: str, statuses: set[str], timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {statuses} after {timeout_s} s: {job}\n{self.log_tail()}")

    def wait_quantizing(self, job_id: str, timeout_s: float = 90) -> None:
        """Until the job has finished at least one block (so it is really mid-run)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            progress = job.get("progress") or {}
            if job["status"] == "running" and progress.get("stage") == "quantizing":
                return
            assert job["status"] in ("queued", "running"), job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} never started quantizing\n{self.log_tail()}")

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def openai(self, api_key: str = KEY) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def sse_events(resp: httpx.Response) -> list[Any]:
    """Parse an SSE body: JSON objects, and the literal '[DONE]'."""
    events: list[Any] = []
    for block in resp.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("e2e")
    roots = base / "models"
    roots.mkdir()
    outside = base / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (roots / "link-out").symlink_to(outside, target_is_directory=True)
    srv = Server(base / "data", roots, base / "service.log")
    try:
        # The shared job is queued while no job runner exists, then must survive a restart.
        srv.start(jobs=False)
        resp = srv.http.post("/v1/quantization/jobs", json=TINY, headers={"Idempotency-Key": "shared-job"})
        assert resp.status_code == 200, resp.text
        srv.shared_job = resp.json()["id"]
        time.sleep(1.0)
        assert srv.job(srv.shared_job)["status"] == "queued"
        srv.restart(jobs=True)
        yield srv
    finally:
        srv.stop()
        srv.http.close()


# ---------------------------------------------------------------------------------------
# Restart with a queued job; health, models, metrics
# ---------------------------------------------------------------------------------------
def test_queued_job_survives_restart_and_runs(server: Server) -> None:
    job = server.wait_job(server.shared_job, {"running", "succeeded"}, timeout_s=30)
    assert job["started_at"] is not None
    types = [e["type"] for e in server.http.get(f"/v1/quantization/jobs/{server.shared_job}/events").json()["data"]]
    assert types[:2] == ["created", "started"]


def test_health_models_metrics(server: Server) -> None:
    health = server.health()
    assert health["status"] == "ok" and health["worker"]["pid"] > 0
    assert health["worker"]["device"] == "cpu" and health["worker"]["backend"] == "cpu"  # no GPU in CI
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    ids = [m["id"] for m in server.http.get("/v1/models").json()["data"]]
    assert ids[0] == BUILTIN
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r"^mm_worker_up 1\.0$", metrics, re.M) and 'mm_jobs{status="running"}' in metrics
    device_info = [s.labels for f in text_string_to_metric_families(metrics) if f.name == "mm_worker_device_info" for s in f.samples]
    assert [(d["device"], d["backend"]) for d in device_info] == [("cpu", "cpu")] and "name" in device_info[0], metrics


# ---------------------------------------------------------------------------------------
# Completions over httpx
# ---------------------------------------------------------------------------------------
def test_completion_httpx(server: Server) -> None:
    resp = server.http.post("/v1/completions", json={"model": BUILTIN, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "logprobs": 2})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == BUILTIN
    choice = body["choices"][0]
    assert "Paris" in choice["text"] and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 4 and len(lp["top_logprobs"][0]) == 2 and lp["text_offset"][0] == 0
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4
    # echo + stop string; token-id prompt; several prompts
    echo = server.http.post("/v1/completions", json={"model": BUILTIN, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "echo": True, "stop": ["."]}).json()
    assert echo["choices"][0]["text"].startswith("The capital of France is Paris") and "." not in echo["choices"][0]["text"]
    assert echo["choices"][0]["finish_reason"] == "stop"
    multi = server.http.post("/v1/completions", json={"model": BUILTIN, "prompt": ["Hello", "Paris is"], "max_tokens": 2, "temperature": 0, "n": 2}).json()
    assert [c["index"] for c in multi["choices"]] == [0, 1, 2, 3]
    assert multi["choices"][0]["text"] == multi["choices"][1]["text"]  # greedy: n copies agree
    ids = server.http.post("/v1/completions", json={"model": BUILTIN, "prompt": [504, 3575, 282, 4649, 314], "max_tokens": 2, "temperature": 0}).json()
    assert ids["usage"]["prompt_tokens"] == 5


def test_streaming_completion_httpx_with_usage(server: Server) -> None:
    resp = server.http.post("/v1/completions", json={"model": BUILTIN, "prompt": "One, two,", "max_tokens": 5, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    plain = server.http.post("/v1/completions", json={"model": BUILTIN, "prompt": "One, two,", "max_tokens": 5, "temperature": 0}).json()
    assert text == plain["choices"][0]["text"]  # greedy: streaming and not agree


# ---------------------------------------------------------------------------------------
# The official openai client
# ---------------------------------------------------------------------------------------
def test_openai_client_completions_and_chat(server: Server) -> None:
    client = server.openai()
    comp = client.completions.create(model=BUILTIN, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert "Paris" in comp.choices[0].text and comp.usage.completion_tokens == 3
    stream = client.completions.create(model=BUILTIN, prompt="The capital of France is", max_tokens=3, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == comp.choices[0].text

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=BUILTIN, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert "Paris" in chat.choices[0].message.content
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2

    chunks = list(client.chat.completions.create(model=BUILTIN, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason

    seeded = [client.chat.completions.create(model=BUILTIN, messages=messages, max_tokens=5, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_gemma3_builtin_serves_chat_completions(server: Server) -> None:
    """The second built-in model, Gemma 3 270M (when its package is installed): listed, and
    served over /v1/chat/completions with its own chat template and end-of-turn token."""
    from conftest import require_gemma3

    require_gemma3()
    gemma = "gemma-3-270m"
    assert [m["id"] for m in server.http.get("/v1/models").json()["data"]][:2] == [BUILTIN, gemma]
    resp = server.http.post("/v1/chat/completions", json={
        "model": gemma, "messages": [{"role": "user", "content": "Name the capital of France."}], "max_tokens": 3, "temperature": 0,
    })
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == gemma and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == 15 and 1 <= body["usage"]["completion_tokens"] <= 3  # <bos> + Gemma's turn format
    forced = server.http.post("/v1/chat/completions", json={
        "model": gemma, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0, "logit_bias": {"106": 100},
    }).json()
    assert forced["choices"][0]["finish_reason"] == "stop" and forced["usage"]["completion_tokens"] == 1  # <end_of_turn> ends it


def test_openai_client_errors(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="wrong").models.list()
    client = server.openai()
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert nf.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=BUILTIN, prompt="x", max_tokens=1, temperature=3)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as ctx:
        client.completions.create(model=BUILTIN, prompt="x", max_tokens=10**6)
    assert ctx.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as role:
        client.chat.completions.create(model=BUILTIN, messages=[{"role": "user"}], max_tokens=1)
    assert role.value.status_code == 400


# ---------------------------------------------------------------------------------------
# Disconnects, limits, error statuses
# ---------------------------------------------------------------------------------------
def _wait_worker_idle(server: Server, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.health()["worker"]["active_requests"] == 0 and "mm_inflight_generations 0" in httpx.get(f"{server.url}/metrics").text:
            return
        time.sleep(0.3)
    raise AssertionError(f"generations still active after the client left: {server.health()}")


def test_client_disconnect_cancels_generation(server: Server) -> None:
    started = time.monotonic()
    with server.http.stream("POST", "/v1/chat/completions", json={"model": BUILTIN, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # got real text; now hang up
    _wait_worker_idle(server)
    assert time.monotonic() - started < 40  # 400 tokens would take far longer


def test_client_disconnect_cancels_non_streaming_generation(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx.Timeout(10, read=2.0),
                   json={"model": BUILTIN, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True})
    _wait_worker_idle(server)
    assert time.monotonic() - started < 40


def test_inflight_limit_429(server: Server) -> None:
    body = {"model": BUILTIN, "prompt": "Count:", "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
    streams = []
    try:
        for _ in range(3):
            cm = server.http.stream("POST", "/v1/completions", json=body)
            resp = cm.__enter__()
            assert resp.status_code == 200
            streams.append(cm)
        over = server.http.post("/v1/completions", json={**body, "stream": False})
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_requests"
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
    _wait_worker_idle(server)


def test_error_statuses(server: Server) -> None:
    def err(resp: httpx.Response, status: int) -> dict[str, Any]:
        assert resp.status_code == status, resp.text
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
        return resp.json()["error"]

    err(httpx.post(f"{server.url}/v1/completions", json={"model": BUILTIN, "prompt": "x"}), 401)
    err(server.http.post("/v1/completions", json={"model": BUILTIN, "prompt": "x", "top_p": 0}), 400)
    err(server.http.get("/v1/quantization/jobs/qjob-000000000000000000000000"), 404)
    err(server.http.post("/v1/completions", json={"model": BUILTIN, "prompt": "x" * (2 << 20)}), 413)
    # idempotency: same key, same body -> same job; different body -> 422
    same = server.http.post("/v1/quantization/jobs", json=TINY, headers={"Idempotency-Key": "shared-job"})
    assert same.json()["id"] == server.shared_job and same.headers["idempotent-replayed"] == "true"
    assert err(server.http.post("/v1/quantization/jobs", json={**TINY, "bits": 3}, headers={"Idempotency-Key": "shared-job"}), 422)["code"] == "idempotency_key_reused"
    # result before success -> 409
    server.wait_job(server.shared_job, {"running", "succeeded"})
    if server.job(server.shared_job)["status"] == "running":
        assert err(server.http.get(f"/v1/quantization/jobs/{server.shared_job}/result"), 409)["code"] == "job_not_succeeded"
    # bounded queue (MM_MAX_QUEUED_JOBS=2) while the shared job runs -> 429; queued jobs cancel at once
    queued = [server.http.post("/v1/quantization/jobs", json=TINY).json()["id"] for _ in range(2)]
    assert err(server.http.post("/v1/quantization/jobs", json=TINY), 429)["code"] == "job_queue_full"
    for job_id in queued:
        assert server.http.post(f"/v1/quantization/jobs/{job_id}/cancel").json()["status"] == "cancelled"


def test_path_escape_attempts(server: Server) -> None:
    outside = server.roots.parent / "outside"
    for path in ("../outside", "link-out/../../outside", str(outside), "/etc", "link-out", "link-out/config.json"):
        resp = server.http.post("/v1/quantization/jobs", json={**TINY, "model": {"source": "path", "path": path}})
        assert resp.status_code == 400, (path, resp.text)
        assert resp.json()["error"]["code"] == "path_not_allowed" and resp.json()["error"]["param"] == "model.path"
    resp = server.http.post("/v1/quantization/jobs", json={**TINY, "calibration": {"source": "text", "path": str(outside / "config.json")}})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "path_not_allowed"


# ---------------------------------------------------------------------------------------
# The shared job's result
# ---------------------------------------------------------------------------------------
def test_shared_job_succeeds_with_progress_events(server: Server) -> None:
    job = server.wait_job(server.shared_job, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    assert job["result_model"] == server.shared_job and job["stats"]["bits"] == 4 and job["stats"]["group_size"] == 64
    assert {f["filename"] for f in job["result_files"]} >= {"model.safetensors", "config.json", "tokenizer.json", "quant_stats.json"}
    events = server.http.get(f"/v1/quantization/jobs/{server.shared_job}/events", params={"limit": 1000}).json()["data"]
    blocks = [e["data"]["block"] for e in events if e["type"] == "progress" and e["data"]["stage"] == "quantizing"]
    assert blocks == list(range(1, 31))
    assert events[-1]["type"] == "succeeded"
    assert server.shared_job in [m["id"] for m in server.http.get("/v1/models").json()["data"]]


def test_result_downloads_loads_and_generates(server: Server, tmp_path: Path) -> None:
    from safetensors import safe_open

    job = server.job(server.shared_job)
    folder = tmp_path / "model"
    folder.mkdir()
    for f in job["result_files"]:
        resp = server.http.get(f"/v1/quantization/jobs/{server.shared_job}/result", params={"file": f["filename"]})
        assert resp.status_code == 200 and len(resp.content) == f["bytes"]
        (folder / f["filename"]).write_bytes(resp.content)
    default = server.http.get(f"/v1/quantization/jobs/{server.shared_job}/result")
    assert default.content == (folder / "model.safetensors").read_bytes()
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as st:
        keys = set(st.keys())
        assert "model.layers.0.self_attn.q_proj.scales" in keys and st.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype.name == "uint32"

    from metal_marlin.checkpoints.loader import load_model
    from metal_marlin.generate.engine import Engine
    from metal_marlin.generate.sampling import SamplingParams
    from metal_marlin.tokenizer import Tokenizer

    model, config, metadata = load_model(folder)
    assert metadata["quantization"]["group_size"] == 64
    engine = Engine(model, Tokenizer.from_folder(folder), metadata)
    out = engine.generate("The capital of France is", SamplingParams(max_tokens=3, temperature=0))
    assert out.completion_tokens == 3 and out.text.strip()


def test_serve_quantized_model_by_job_id(server: Server) -> None:
    client = server.openai()
    chat = client.chat.completions.create(model=server.shared_job, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=6, temperature=0)
    assert chat.model == server.shared_job and chat.usage.completion_tokens >= 1 and chat.choices[0].message.content


def test_smoke_checks(server: Server) -> None:
    """scripts/smoke.py's checks against this server; its job part on the shared job's result."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        assert smoke.wait_healthy(client, 30)["status"] == "ok"
        assert server.shared_job in smoke.check_models(client)
        assert "Paris" in smoke.check_completion(client)
        content, n_events = smoke.check_streamed_chat(client)
        assert content and n_events >= 3
        job = server.job(server.shared_job)
        size, n_tensors = smoke.check_result(client, job)
        assert size == {f["filename"]: f["bytes"] for f in job["result_files"]}["model.safetensors"] and n_tensors > 100
        assert smoke.check_completion(client, server.shared_job)
        with pytest.raises(smoke.SmokeFailure):
            smoke.check_completion(client, "no-such-model")


def test_job_from_uploaded_files_with_live_events(server: Server) -> None:
    """Upload the built-in GGUF and a calibration text, quantize them, follow the job's events
    live (SSE), resume the stream mid-way, download the result; then delete the uploads."""
    from metal_marlin.assets import builtin_model_path, wikipedia_summaries_path

    gguf = builtin_model_path()
    texts = [v["extract"] for v in json.loads(wikipedia_summaries_path().read_text(encoding="utf-8")).values()][:40]
    with open(gguf, "rb") as fh:
        model = server.http.post("/v1/files", files={"file": ("smollm2.gguf", fh)}, data={"purpose": "model"}, timeout=300)
    assert model.status_code == 200, model.text
    model = model.json()
    assert model["bytes"] == gguf.stat().st_size and model["filename"] == "smollm2.gguf"
    assert (server.data_dir / "files" / model["id"]).stat().st_size == model["bytes"]
    calib = server.http.post("/v1/files", files={"file": ("wiki.txt", "\n\n".join(texts).encode())}, data={"purpose": "calibration"}).json()

    body = {**TINY, "model": {"source": "file", "file_id": model["id"]}, "calibration": {"source": "file", "file_id": calib["id"]}}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        started = time.monotonic()
        job, events = smoke.run_job(client, body, JOB_TIMEOUT_S)
        assert job["model_source"] == {"source": "file", "path": None, "file_id": model["id"]}
        assert "text file" in job["stats"]["calibration"]
        types = [e["type"] for _, e in events]
        assert types[:2] == ["created", "started"] and types[-1] == "succeeded"
        arrivals = {e["data"]["block"]: t - started for t, e in events if e["type"] == "progress" and e["data"]["stage"] == "quantizing"}
        assert sorted(arrivals) == list(range(1, 31))
        assert arrivals[30] - arrivals[1] > 2.0, arrivals  # streamed while the job ran, not all at the end
        listed = server.http.get(f"/v1/quantization/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
        assert [e for _, e in events] == listed
        # resume mid-way: the rest, then [DONE] at once (the job is over)
        middle = listed[len(listed) // 2]["id"]
        resp = server.http.get(f"/v1/quantization/jobs/{job['id']}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": middle})
        tail = [data for _, data in smoke.sse_lines(resp)]
        assert tail[-1] == "[DONE]" and [e["id"] for e in tail[:-1]] == [e["id"] for e in listed[len(listed) // 2 + 1:]]
        smoke.check_result(client, job)
    chat = server.openai().chat.completions.create(model=job["id"], messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
    assert chat.usage.completion_tokens >= 1

    for f in (model, calib):
        assert server.http.delete(f"/v1/files/{f['id']}").json()["deleted"]
    assert server.http.delete(f"/v1/quantization/jobs/{job['id']}").status_code == 200
    assert not list((server.data_dir / "files").glob("file-*")) and not list((server.data_dir / "files" / ".tmp").iterdir())


def test_upload_over_the_limit_leaves_nothing(server: Server) -> None:
    def body() -> Iterator[bytes]:  # chunked: the limit is found while streaming
        yield b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nmodel\r\n'
        yield b'--xx\r\nContent-Disposition: form-data; name="file"; filename="big.gguf"\r\n\r\nGGUF'
        for _ in range(UPLOAD_LIMIT // (1 << 20) + 4):
            yield b"\0" * (1 << 20)
        yield b"\r\n--xx--\r\n"

    try:
        resp = server.http.post("/v1/files", headers={"Content-Type": "multipart/form-data; boundary=xx"}, content=body())
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    except httpx.TransportError:
        pass  # the server may close the connection before the client has sent everything
    assert server.http.get("/health").status_code == 200
    assert not list((server.data_dir / "files").glob("file-*")) and not list((server.data_dir / "files" / ".tmp").iterdir())


# ---------------------------------------------------------------------------------------
# Cancellation, worker crash, service restart, delete
# ---------------------------------------------------------------------------------------
def test_cancel_running_job(server: Server) -> None:
    job_id = server.http.post("/v1/quantization/jobs", json=TINY).json()["id"]
    server.wait_quantizing(job_id)
    resp = server.http.post(f"/v1/quantization/jobs/{job_id}/cancel")
    assert resp.status_code == 200 and resp.json()["cancel_requested"]
    job = server.wait_job(job_id, {"cancelled", "succeeded", "failed"}, timeout_s=30)
    assert job["status"] == "cancelled" and job["result_files"] == []
    types = [e["type"] for e in server.http.get(f"/v1/quantization/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]]
    assert "cancel_requested" in types and types[-1] == "cancelled"
    assert server.http.get(f"/v1/quantization/jobs/{job_id}/result").status_code == 409
    assert not (server.data_dir / "jobs" / job_id).exists()


def test_worker_sigkill_mid_job_and_mid_stream(server: Server) -> None:
    job_id = server.http.post("/v1/quantization/jobs", json=TINY).json()["id"]
    server.wait_quantizing(job_id)
    worker_pid = server.health()["worker"]["pid"]
    body = {"model": BUILTIN, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
    with server.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break
        os.kill(worker_pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]  # must end, not hang
    assert rest, "the stream ended without an error event"
    last = json.loads(rest[-1][len("data: "):])
    assert last["error"]["code"] == "worker_unavailable" and "[DONE]" not in rest

    # the retry policy: the job goes back to the queue (attempt 1 of 3) and the new worker runs it
    job = server.wait_job(job_id, {"failed", "succeeded", "cancelled"}, timeout_s=120)
    assert job["status"] == "succeeded", job
    events = server.http.get(f"/v1/quantization/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    requeued = [e for e in events if e["type"] == "requeued"]
    assert len(requeued) == 1 and requeued[0]["level"] == "warning" and "SIGKILL" in requeued[0]["message"]
    assert requeued[0]["data"] == {"code": "worker_crashed", "attempt": 1, "max_attempts": 3}
    assert [e["type"] for e in events].count("started") == 2
    assert verify_result(server.data_dir / "jobs" / job_id) == []  # what is visible is what the job wrote
    assert job["result_files"] and all(len(f["sha256"]) == 64 for f in job["result_files"])
    assert not list((server.data_dir / "jobs" / ".staging").glob(f"{job_id}*"))
    health = server.wait_healthy(60)  # the job ran on the new worker, so it is up
    assert health["worker"]["pid"] != worker_pid and health["worker"]["restarts"] >= 1
    # the new worker serves again (the quantized model loads in about a second)
    again = server.http.post("/v1/completions", json={"model": server.shared_job, "prompt": "Hello", "max_tokens": 1})
    assert again.status_code == 200, again.text
    assert re.search(r"^mm_worker_restarts_total 1\.0$", httpx.get(f"{server.url}/metrics").text, re.M)


def test_service_restart_keeps_history_and_results(server: Server) -> None:
    before = {j["id"]: j["status"] for j in server.http.get("/v1/quantization/jobs", params={"limit": 100}).json()["data"]}
    size = server.job(server.shared_job)["result_files"]
    server.restart()
    after = {j["id"]: j["status"] for j in server.http.get("/v1/quantization/jobs", params={"limit": 100}).json()["data"]}
    assert after == before and after[server.shared_job] == "succeeded"
    assert server.job(server.shared_job)["result_files"] == size
    resp = server.http.get(f"/v1/quantization/jobs/{server.shared_job}/result", params={"file": "config.json"})
    assert resp.status_code == 200 and json.loads(resp.content)["quantization"]["bits"] == 4


def test_delete_job_removes_files_and_model(server: Server) -> None:
    job_id = server.shared_job
    resp = server.http.delete(f"/v1/quantization/jobs/{job_id}")
    assert resp.status_code == 200 and resp.json() == {"id": job_id, "object": "quantization.job", "deleted": True}
    assert not (server.data_dir / "jobs" / job_id).exists()
    assert server.http.get(f"/v1/quantization/jobs/{job_id}").status_code == 404
    assert job_id not in [m["id"] for m in server.http.get("/v1/models").json()["data"]]
    gone = server.http.post("/v1/completions", json={"model": job_id, "prompt": "x", "max_tokens": 1})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert server.http.delete(f"/v1/quantization/jobs/{job_id}").status_code == 404


# ---------------------------------------------------------------------------------------
# Operator-registered models (--model NAME=PATH); its own server, without the shared job
# ---------------------------------------------------------------------------------------
def test_served_autoawq_folder_generates_like_the_native_folder(tmp_path_factory: pytest.TempPathFactory, quantized_dir: Path) -> None:
    from metal_marlin.checkpoints.autoawq import export_autoawq

    base = tmp_path_factory.mktemp("served")
    awq = export_autoawq(quantized_dir, base / "smollm2-awq")
    srv = Server(base / "data", base, base / "service.log", extra_args=["--model", f"native={quantized_dir}", "--model", f"awq={awq}"])
    try:
        srv.start(jobs=False)
        ids = [m["id"] for m in srv.http.get("/v1/models").json()["data"]]
        from metal_marlin.assets import installed_builtin_models

        assert ids == [*installed_builtin_models(), "native", "awq"], ids
        completion, chat = {}, {}
        for name in ("native", "awq"):
            resp = srv.http.post("/v1/completions", json={"model": name, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
            assert resp.status_code == 200, resp.text
            completion[name] = resp.json()["choices"][0]["text"]
            resp = srv.http.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 6, "temperature": 0})
            assert resp.status_code == 200, resp.text
            chat[name] = resp.json()["choices"][0]["message"]["content"]
        assert completion["native"].strip() and completion["awq"] == completion["native"], completion
        assert chat["native"].strip() and chat["awq"] == chat["native"], chat
        resp = srv.http.post("/v1/completions", json={"model": str(awq), "prompt": "x", "max_tokens": 1})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"  # paths are not model names
    finally:
        srv.stop()
        srv.http.close()
