"""The gateway on the Postgres job store: two replicas (each its own uvicorn server and data
directory, no worker) share one database through ``MM_DATABASE_URL``, over real HTTP.

Skips, saying why, when no PostgreSQL server can be had (see ``_postgres.py``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from _net import free_port
from jobstore import DATABASE_URL_ENV, open_store
from service.app import create_app
from service.config import Settings

KEY = "pg-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TINY = {"n_samples": 2, "seq_len": 32, "n_grid": 2}


class Gateway:
    """``create_app`` served by uvicorn in a thread on a loopback port."""

    def __init__(self, data_dir: Path) -> None:
        self.settings = Settings(data_dir=data_dir, api_key=KEY, max_queued_jobs=10)
        self.app = create_app(self.settings, start_worker=False)
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30)

    def __enter__(self) -> Gateway:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def gateways(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Gateway, Gateway]]:
    monkeypatch.setenv(DATABASE_URL_ENV, postgres_url)
    with Gateway(tmp_path / "a") as a, Gateway(tmp_path / "b") as b:
        yield a, b


def test_two_gateway_replicas_share_the_job_api_through_postgres(gateways: tuple[Gateway, Gateway], tmp_path: Path) -> None:
    a, b = gateways
    first = a.http.post("/v1/quantization/jobs", json=TINY, headers={"Idempotency-Key": "pg-1"})
    assert first.status_code == 200, first.text
    job_id = first.json()["id"]
    assert first.json()["status"] == "queued"
    # the same key on the other replica: the same job, replayed
    again = b.http.post("/v1/quantization/jobs", json=dict(reversed(list(TINY.items()))), headers={"Idempotency-Key": "pg-1"})
    assert again.status_code == 200 and again.json()["id"] == job_id and again.headers["idempotent-replayed"] == "true"
    reused = b.http.post("/v1/quantization/jobs", json={**TINY, "bits": 8}, headers={"Idempotency-Key": "pg-1"})
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"

    ids = [job_id] + [b.http.post("/v1/quantization/jobs", json=TINY).json()["id"] for _ in range(2)]
    page = a.http.get("/v1/quantization/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = a.http.get("/v1/quantization/jobs", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert b.http.get(f"/v1/quantization/jobs/{ids[1]}").json()["status"] == "queued"

    cancelled = b.http.post(f"/v1/quantization/jobs/{ids[1]}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert a.http.get(f"/v1/quantization/jobs/{ids[1]}").json()["status"] == "cancelled"
    assert [e["type"] for e in a.http.get(f"/v1/quantization/jobs/{ids[1]}/events").json()["data"]] == ["created", "cancelled"]
    for gateway in (a, b):  # both replicas count the shared table
        metrics = gateway.http.get("/metrics").text.splitlines()
        assert 'mm_jobs{status="queued"} 2.0' in metrics and 'mm_jobs{status="cancelled"} 1.0' in metrics and "mm_job_queue_depth 2.0" in metrics

    # the jobs live in Postgres: no replica wrote a SQLite file
    assert not any(tmp_path.rglob("jobs.sqlite3"))


def test_a_live_event_stream_follows_a_job_that_another_host_runs(gateways: tuple[Gateway, Gateway]) -> None:
    a, _ = gateways
    job_id = a.http.post("/v1/quantization/jobs", json=TINY).json()["id"]
    worker = open_store(a.settings.data_dir)  # a worker host: the same open_store, the same database
    try:
        assert worker.claim("w-remote").id == job_id

        def run() -> None:
            for block in (1, 2):
                time.sleep(0.2)
                worker.record_progress(job_id, "w-remote", {"stage": "quantizing", "block": block, "n_blocks": 2, "elapsed_s": 0.0}, f"Block {block}/2")
            worker.finish(job_id, "w-remote", "succeeded", result={"files": [], "stats": {}}, message="Job succeeded")

        thread = threading.Thread(target=run)
        lines: list[str] = []
        with a.http.stream("GET", f"/v1/quantization/jobs/{job_id}/events", params={"stream": "true"}) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            thread.start()
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[len("data: "):])
        thread.join()
        assert lines[-1] == "[DONE]"
        types = [json.loads(text)["type"] for text in lines[:-1]]
        assert types == ["created", "started", "progress", "progress", "succeeded"]
    finally:
        worker.close()
