"""The worker's internal API in-process (no model is loaded): token, readiness, refusals."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from jobstore import open_store
from worker.app import WorkerState, create_worker_app
from worker.generation import MIB, ModelRegistry
from worker.protocol import WORKER_TOKEN_HEADER


def make_client(tmp_path: Path, token: str | None = "tok", served: dict[str, Path] | None = None) -> TestClient:
    store = open_store(tmp_path)
    state = WorkerState(worker_id="w-test", store=store, registry=ModelRegistry(tmp_path, store, 64 * MIB, served=served), runner=None, token=token)
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


def test_models_that_cannot_load_are_409_or_500_named_by_id(tmp_path: Path) -> None:
    gone = tmp_path / "models" / "gone.gguf"
    corrupt = tmp_path / "models" / "corrupt.gguf"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00 and then nothing a GGUF reader understands")
    job_id = "qjob-000000000000000000000001"
    with make_client(tmp_path / "data", token=None, served={"gone": gone, "corrupt": corrupt}) as client:
        store = client.app.state.worker.store
        job, _ = store.create_job({"model": {"source": "builtin"}})
        store.claim("w")
        store.finish(job.id, "w", "succeeded", message="ok")  # its result folder was never (or no longer) there
        for model, status, code in (("gone", 409, "model_files_missing"), (job.id, 409, "model_files_missing"), ("corrupt", 500, "model_load_failed"), (job_id, 404, "model_not_found")):
            resp = client.post("/generate", json={"model": model, "prompt": "x"})
            err = resp.json()["error"]
            assert resp.status_code == status and err["code"] == code, resp.text
            assert repr(model) in err["message"] and str(tmp_path) not in resp.text and "Traceback" not in resp.text, resp.text
        assert client.get("/models").json()["data"] == []  # nothing was loaded
