"""Past one machine, with real parts: two gateways and two workers (separate processes, over
loopback TCP with a shared worker token) on one PostgreSQL job store and one S3 API server
(moto) for results.

Most jobs here quantize a tiny random Llama (2 blocks, SmolLM2's tokenizer) with plain
round-to-nearest (``method: "rtn"``): the point of these tests is that each job runs exactly
once and its result is shared, not quantization quality, and 50 AWQ runs of the built-in model
would take many minutes on two shared cores. The kill test uses the built-in SmolLM2 (still
``rtn``), whose load takes long enough to SIGKILL its worker while the job runs.

Skips, saying why, when PostgreSQL or moto cannot be had.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from _net import free_port
from worker.protocol import WORKER_TOKEN_HEADER

KEY = "scale-key"
TOKEN = "shared-worker-token"
AUTH = {"Authorization": f"Bearer {KEY}"}
TINY_JOB = {"model": {"source": "path", "path": "tiny"}, "method": "rtn", "n_samples": 2, "seq_len": 32, "n_grid": 2, "group_size": 32}
N_JOBS = 50


@dataclass
class Proc:
    """A server subprocess on a loopback port, its output in a log file."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str, timeout_s: float = 90) -> Proc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"
            try:
                if httpx.get(self.url + ready_path, headers=self.headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready within {timeout_s} s\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _tiny_model(root: Path) -> None:
    """A 2-block random Llama with SmolLM2's vocabulary and tokenizer, as a Hugging Face folder."""
    from conftest import tiny_checkpoint

    from metal_marlin.checkpoints.hf import save_hf_folder
    from metal_marlin.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(None)
    cfg, weights = tiny_checkpoint(vocab_size=tokenizer.vocab_size, max_position_embeddings=512)
    save_hf_folder(root / "tiny", weights, cfg)
    tokenizer.save(root / "tiny")


@dataclass
class Cluster:
    gateways: list[Proc]
    workers: list[Proc]
    env: dict[str, str]
    http: list[httpx.Client]
    database_url: str


@pytest.fixture(scope="module")
def cluster(postgres_server: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("scale")
    roots = tmp / "models"
    _tiny_model(roots)
    schema, database_url = postgres_server.new_schema()
    bucket = s3_server.new_bucket()
    env = {
        **os.environ, **s3_server.env(),
        "MM_DATABASE_URL": database_url, "MM_RESULTS_URL": f"s3://{bucket}/scale",
        "MM_WORKER_TOKEN": TOKEN, "MM_MODEL_ROOTS": str(roots),
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MM_WORKER_THREADS": "1",
        "MM_MAX_QUEUED_JOBS": str(2 * N_JOBS), "MM_MAX_JOBS_PER_KEY": str(2 * N_JOBS),
        "MM_JOB_LEASE_S": "4",  # a SIGKILLed worker's job is taken back after 4 s without a heartbeat
    }
    workers = []
    for i in range(2):
        port = free_port()
        cmd = [sys.executable, "-m", "worker", "--data-dir", str(tmp / f"worker{i}"), "--host", "127.0.0.1", "--port", str(port),
               "--memory-mb", "1024", "--log-level", "warning"]
        if i == 0:
            cmd += ["--model", f"tiny-served={roots / 'tiny'}"]  # served by this worker only
        workers.append(Proc(f"worker{i}", cmd, env, tmp / f"worker{i}.log", port, headers={WORKER_TOKEN_HEADER: TOKEN}))
    gateways = []
    for i in range(2):
        port = free_port()
        cmd = [sys.executable, "-m", "service", "--port", str(port), "--data-dir", str(tmp / f"gateway{i}"), "--api-key", KEY,
               "--log-level", "warning", *[arg for w in workers for arg in ("--worker", w.url)]]
        gateways.append(Proc(f"gateway{i}", cmd, env, tmp / f"gateway{i}.log", port))
    try:
        for w in workers:
            w.start("/ready")
        for g in gateways:
            g.start("/health")
        http = [httpx.Client(base_url=g.url, headers=AUTH, timeout=60) for g in gateways]
        yield Cluster(gateways, workers, env, http, database_url)
        for client in http:
            client.close()
    finally:
        for p in gateways + workers:
            p.stop()
        postgres_server.drop_schema(schema)


def _wait_all(http: httpx.Client, ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    jobs: dict[str, dict[str, Any]] = {}
    while True:
        for job_id in ids:
            if jobs.get(job_id, {}).get("status") not in ("succeeded", "failed", "cancelled"):
                jobs[job_id] = http.get(f"/v1/quantization/jobs/{job_id}").json()
        pending = [j for j in jobs.values() if j["status"] in ("queued", "running")]
        if not pending:
            return jobs
        assert time.monotonic() < deadline, f"{len(pending)} jobs not finished, e.g. {pending[0]}"
        time.sleep(0.5)


def _events(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return http.get(f"/v1/quantization/jobs/{job_id}/events", params={"limit": 100}).json()["data"]


def test_fifty_concurrent_jobs_through_two_gateways_each_run_exactly_once(cluster: Cluster) -> None:
    def submit(i: int) -> str:
        resp = cluster.http[i % 2].post("/v1/quantization/jobs", json=TINY_JOB, headers={"Idempotency-Key": f"scale-{i}"})
        assert resp.status_code == 200, resp.text
        return resp.json()["id"]

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(submit, range(N_JOBS)))
    assert len(set(ids)) == N_JOBS
    jobs = _wait_all(cluster.http[0], ids, timeout_s=240)
    assert [j["id"] for j in jobs.values() if j["status"] != "succeeded"] == []

    ran_on: set[str] = set()
    for job_id in ids:
        types = [e["type"] for e in _events(cluster.http[1], job_id)]
        assert types.count("started") == 1 and types.count("succeeded") == 1 and "requeued" not in types, (job_id, types)
        started = next(e for e in _events(cluster.http[0], job_id) if e["type"] == "started")
        ran_on.add(started["data"]["worker"])
    assert len(ran_on) == 2  # both workers claimed jobs from the shared store

    # every result downloads through either gateway, whole (the checksum the API lists)
    for n, job_id in enumerate(ids):
        listed = {f["filename"]: f for f in jobs[job_id]["result_files"]}
        for name in ("config.json", "model.safetensors") if n < 4 else ("config.json",):
            bodies = [h.get(f"/v1/quantization/jobs/{job_id}/result", params={"file": name}) for h in cluster.http]
            assert [b.status_code for b in bodies] == [200, 200]
            assert bodies[0].content == bodies[1].content
            assert hashlib.sha256(bodies[0].content).hexdigest() == listed[name]["sha256"]


def test_models_are_the_union_and_generation_goes_where_the_model_is(cluster: Cluster) -> None:
    lists = [sorted(m["id"] for m in h.get("/v1/models").json()["data"]) for h in cluster.http]
    assert lists[0] == lists[1] and "tiny-served" in lists[0] and "smollm2-135m-instruct" in lists[0]
    for h in cluster.http:
        out = h.post("/v1/completions", json={"model": "tiny-served", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
        assert out.status_code == 200, out.text
    deadline = time.monotonic() + 10  # /health reports the workers as of the last probe (every 2 s)
    while True:
        health = cluster.http[0].get("/health").json()
        by_url = {w["url"]: w for w in health["workers"]}
        if "tiny-served" in by_url[cluster.workers[0].url]["loaded_models"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "tiny-served" in by_url[cluster.workers[0].url]["loaded_models"]
    assert "tiny-served" not in by_url[cluster.workers[1].url]["loaded_models"]
    assert all(w["ready"] and w["device"] for w in health["workers"])


def test_a_worker_killed_mid_job_leaves_the_job_to_the_other(cluster: Cluster) -> None:
    a, b = cluster.http
    job = a.post("/v1/quantization/jobs", json={"method": "rtn", "n_samples": 2, "seq_len": 32, "n_grid": 2}).json()
    deadline = time.monotonic() + 60
    while True:
        started = [e for e in _events(a, job["id"]) if e["type"] == "started"]
        if started:
            break
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    first = started[0]["data"]["worker"]
    ids = {w.name: httpx.get(w.url + "/ready", headers=w.headers).json()["worker_id"] for w in cluster.workers}
    victim = next(w for w in cluster.workers if ids[w.name] == first)
    survivor = next(w for w in cluster.workers if w is not victim)
    victim.stop(signal.SIGKILL)

    done = _wait_all(b, [job["id"]], timeout_s=120)[job["id"]]
    assert done["status"] == "succeeded", done
    events = _events(b, job["id"])
    workers = [e["data"]["worker"] for e in events if e["type"] == "started"]
    assert workers == [first, ids[survivor.name]], events
    requeued = [e for e in events if e["type"] == "requeued"]
    assert len(requeued) == 1 and requeued[0]["data"]["code"] == "worker_lost"
    body = a.get(f"/v1/quantization/jobs/{job['id']}/result", params={"file": "config.json"})
    assert body.status_code == 200 and json.loads(body.content)

    # generation moves to the surviving worker: the gateway no longer routes to the dead one
    for h in cluster.http:
        out = h.post("/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 2})
        assert out.status_code == 200, out.text


# -- the gateway's side alone (no servers) ------------------------------------------------------
def test_worker_urls_are_checked_with_the_setting_named() -> None:
    from service.config import Settings

    assert Settings(workers=(" http://a:1/ ", "", "https://b:2")).workers == ("http://a:1", "https://b:2")
    assert not Settings(workers=("http://a:1",)).spawn_worker
    for bad in (("ftp://a:1",), ("http://a:1/path",), ("http://a:1", "http://a:1")):
        with pytest.raises(ValueError, match="MM_WORKERS"):
            Settings(workers=bad)
    with pytest.raises(ValueError, match="not both"):
        Settings(workers=("http://a:1",), worker_url="http://b:2")


def test_routing_prefers_the_worker_with_the_model_then_the_least_loaded() -> None:
    from service.config import Settings
    from service.workers import WorkerPool

    pool = WorkerPool(Settings(workers=("http://a:1", "http://b:2", "http://c:3")))
    a, b, c = pool.workers
    a.ready, a.info = True, {"loaded_models": [], "active_requests": 0, "free_bytes": 10, "served_models": []}
    b.ready, b.info = True, {"loaded_models": ["m"], "active_requests": 3, "free_bytes": 5, "served_models": ["only-b"]}
    c.ready, c.info = False, {"loaded_models": ["m"], "active_requests": 0}
    assert pool.candidates("m") == [b, a]  # loaded first, however busy; a down worker never
    assert pool.candidates("other") == [a, b]  # then the least loaded
    a.inflight = 5
    assert pool.candidates("other") == [b, a]
    assert pool.candidates("only-b") == [b] and pool.served_models() == {"only-b"}
    assert pool.ready_info["loaded_models"] == ["m"] and pool.ready


def test_a_request_moves_on_when_its_worker_cannot_be_reached_or_is_full(tmp_path: Path) -> None:
    """The open of a generation is where a request may still move: an unreachable worker is
    marked down, a full one (503 insufficient_memory) is skipped but stays up."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    def dead(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def full(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"message": "no room", "type": "service_unavailable_error", "param": None, "code": "insufficient_memory"}})

    def alive(request: httpx.Request) -> httpx.Response:
        lines = [{"event": "start", "prompt_tokens": 1}, {"event": "token", "text": " there", "token_id": 7},
                 {"event": "done", "finish_reason": "length", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}]
        return httpx.Response(200, content="".join(json.dumps(x) + "\n" for x in lines).encode())

    app = create_app(Settings(data_dir=tmp_path, api_key=KEY, workers=("http://dead:1", "http://full:2", "http://alive:3")), start_worker=False)
    pool = app.state.mm.supervisor
    for worker, handler in zip(pool.workers, (dead, full, alive)):
        worker.client = httpx.AsyncClient(base_url=worker.url, transport=httpx.MockTransport(handler))
        worker.ready, worker.info = True, {"loaded_models": [], "active_requests": 0, "max_batch_size": 16}
    with TestClient(app) as client:
        resp = client.post("/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 1}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == " there"
    assert [w.ready for w in pool.workers] == [False, True, True]
    assert [w.inflight for w in pool.workers] == [0, 0, 0]


def test_a_generation_moves_when_its_worker_dies_before_its_first_token(tmp_path: Path) -> None:
    """The first worker's streams break (the worker died): the generation that had produced
    nothing yet is reopened on the second worker, its second ``start`` line dropped; the one
    that had streamed a token ends with the ``worker_unavailable`` error."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    def ndjson(*lines: dict[str, Any]) -> bytes:
        return "".join(json.dumps(x) + "\n" for x in lines).encode()

    start = {"event": "start", "prompt_tokens": 1, "prompt_text": "Hi"}
    done = {"event": "done", "finish_reason": "length", "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def dies(request: httpx.Request) -> httpx.Response:
        streamed = json.loads(request.content)["params"]["max_tokens"] == 2  # this one gets a token out first

        class Broken(httpx.AsyncByteStream):
            async def __aiter__(self):  # type: ignore[override]
                yield ndjson(start, *([{"event": "token", "text": " a", "token_id": 5}] if streamed else []))
                raise httpx.ReadError("peer closed connection")

        return httpx.Response(200, stream=Broken())

    def alive(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=ndjson(start, {"event": "token", "text": " there", "token_id": 7}, done))

    app = create_app(Settings(data_dir=tmp_path, api_key=KEY, workers=("http://dies:1", "http://alive:2")), start_worker=False)
    pool = app.state.mm.supervisor
    for worker, handler in zip(pool.workers, (dies, alive)):
        worker.client = httpx.AsyncClient(base_url=worker.url, transport=httpx.MockTransport(handler))
        worker.ready, worker.info = True, {"loaded_models": [], "active_requests": 0, "max_batch_size": 16}
    pool.workers[1].inflight = 1  # so both requests open on the first worker
    body = {"model": "smollm2-135m-instruct", "prompt": "Hi", "echo": True, "stream": True}
    with TestClient(app) as client:
        moved = client.post("/v1/completions", json={**body, "max_tokens": 1}, headers=AUTH)
        pool.workers[0].ready = True
        failed = client.post("/v1/completions", json={**body, "max_tokens": 2}, headers=AUTH)
    events = [line[len("data: "):] for line in moved.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "Hi there"
    last = json.loads([line for line in failed.text.splitlines() if line.startswith("data: ")][-1][len("data: "):])
    assert last["error"]["code"] == "worker_unavailable" and "stopped during generation" in last["error"]["message"]
    assert [w.inflight for w in pool.workers] == [0, 1]
