"""The worker's internal API in-process (no model is loaded): token, readiness, refusals."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from worker.app import WorkerState, create_worker_app
from worker.generation import MIB, ModelRegistry
from jobstore import open_store
from worker.protocol import WORKER_TOKEN_HEADER


def make_client(tmp_path: Path, token: str | None = "tok") -> TestClient:
    store = open_store(tmp_path)
    state = WorkerState(worker_id="w-test", store=store, registry=ModelRegistry(tmp_path, store, 64 * MIB), runner=None, token=token)
    return TestClient(create_worker_app(state))


def test_token_is_required(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        assert client.get("/ready").status_code == 401
        assert client.get("/ready", headers={WORKER_TOKEN_HEADER: "nope"}).json()["error"]["code"] == "invalid_worker_token"
        ready = client.get("/ready", headers={WORKER_TOKEN_HEADER: "tok"})
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "ready" and body["jobs_enabled"] is False and body["loaded_models"] == [] and body["active_requests"] == 0
        device = body["device_info"]  # the compute device, for the service's /health and /metrics
        assert device["device"] == "cpu" and device["backend"] == "cpu" and device["device_name"]
        import mlx.core as mx

        assert device["mlx"] == mx.__version__ and isinstance(device["memory_bytes"], int)


def test_generate_refusals_before_any_model_loads(tmp_path: Path) -> None:
    with make_client(tmp_path, token=None) as client:
        unknown = client.post("/generate", json={"model": "qjob-000000000000000000000000", "prompt": "x"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        both = client.post("/generate", json={"model": "smollm2-135m-instruct", "prompt": "x", "messages": [{"role": "user", "content": "x"}]})
        assert both.status_code == 400
        neither = client.post("/generate", json={"model": "smollm2-135m-instruct"})
        assert neither.status_code == 400
        bad = client.post("/generate", json={"model": "smollm2-135m-instruct", "prompt": "x", "params": {"nope": 1}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "params.nope"
        assert client.post("/jobs/wake").status_code == 204
        assert client.get("/models").json() == {"budget_bytes": 64 * MIB, "used_bytes": 0, "data": []}
        assert client.post("/models/anything/unload").status_code == 204
