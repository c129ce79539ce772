"""The service app in-process, without a worker: validation, errors, auth, jobs API, metrics.

Generation needs the worker (see test_service_e2e.py); here it must answer 503 cleanly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from jobstore import open_store
from metal_marlin.assets import installed_builtin_models
from service.app import create_app
from service.config import Settings

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TINY = {"n_samples": 2, "seq_len": 32, "n_grid": 2}


@pytest.fixture
def model_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    good = root / "tiny"
    good.mkdir(parents=True)
    (good / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "head_dim": 16}))
    (root / "calib.txt").write_text("Some text.\n\nMore text.\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    return root


@pytest.fixture
def settings(tmp_path: Path, model_root: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_key=KEY, model_roots=str(model_root), max_queued_jobs=3, max_body_bytes=4096)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, start_worker=False)
    with TestClient(app) as c:
        yield c


def assert_error(resp, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def test_health_is_503_without_a_worker(client: TestClient) -> None:
    resp = client.get("/health")
    assert resp.status_code == 503 and resp.json()["status"] == "starting"


def test_generation_without_worker_is_503(client: TestClient) -> None:
    resp = client.post("/v1/completions", headers=AUTH, json={"model": "smollm2-135m-instruct", "prompt": "hi"})
    err = assert_error(resp, 503, "worker_unavailable")
    assert err["type"] == "service_unavailable_error" and resp.headers["retry-after"]


def test_auth(client: TestClient) -> None:
    assert_error(client.get("/v1/models"), 401, "missing_api_key")
    assert_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    assert_error(client.get("/v1/quantization/jobs", headers={"Authorization": "Basic abc"}), 401)
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert client.get("/metrics").status_code == 200  # operations routes are open


def test_models_lists_builtin(client: TestClient) -> None:
    data = client.get("/v1/models", headers=AUTH).json()
    assert data["object"] == "list" and data["data"][0]["id"] == "smollm2-135m-instruct"
    assert client.get("/v1/models/smollm2-135m-instruct", headers=AUTH).json()["object"] == "model"
    assert_error(client.get("/v1/models/qjob-000000000000000000000000", headers=AUTH), 404, "model_not_found")


def test_error_shapes(client: TestClient) -> None:
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.put("/v1/models", headers=AUTH), 405, "method_not_allowed")
    assert client.put("/v1/quantization/jobs/qjob-1", headers=AUTH).headers["allow"] == "DELETE, GET, HEAD"
    bad_json = client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"}, content=b"{not json")
    assert_error(bad_json, 400, "invalid_json")
    assert_error(client.post("/v1/completions", headers=AUTH, json={"prompt": "x"}), 400, "missing_required_parameter", "model")
    assert_error(
        client.post("/v1/completions", headers=AUTH, json={"model": "m", "prompt": "x", "temperature": 5}),
        400, "invalid_value", "temperature",
    )
    assert_error(
        client.post("/v1/chat/completions", headers=AUTH, json={"model": "m", "messages": []}), 400, param="messages"
    )


def test_unknown_model_and_unsupported_parameters(client: TestClient) -> None:
    base = {"model": "smollm2-135m-instruct"}
    assert_error(client.post("/v1/completions", headers=AUTH, json={"model": "gpt-4", "prompt": "x"}), 404, "model_not_found", "model")
    assert_error(client.post("/v1/completions", headers=AUTH, json={**base, "prompt": "x", "suffix": "y"}), 400, param="suffix")
    assert_error(client.post("/v1/completions", headers=AUTH, json={**base, "prompt": "x", "best_of": 3}), 400, param="best_of")
    assert_error(client.post("/v1/completions", headers=AUTH, json={**base, "prompt": "x", "logit_bias": {"a": 1}}), 400, param="logit_bias.a")
    assert_error(client.post("/v1/completions", headers=AUTH, json={**base, "prompt": "x", "echo": True, "logprobs": 1}), 400, param="echo")
    assert_error(client.post("/v1/completions", headers=AUTH, json={**base, "prompt": ["a"] * 9, "n": 2}), 400, "too_many_generations")
    msgs = [{"role": "user", "content": "hi"}]
    assert_error(client.post("/v1/chat/completions", headers=AUTH, json={**base, "messages": msgs, "tools": [{"type": "function"}]}), 400, param="tools")
    assert client.post("/v1/chat/completions", headers=AUTH, json={**base, "messages": msgs, "tools": [], "tool_choice": "none"}).status_code == 503
    assert_error(client.post("/v1/chat/completions", headers=AUTH, json={**base, "messages": msgs, "top_logprobs": 2}), 400, param="top_logprobs")
    assert_error(
        client.post("/v1/chat/completions", headers=AUTH, json={**base, "messages": msgs, "response_format": {"type": "json_object"}}),
        400, param="response_format.type",
    )


def test_body_size_limit(client: TestClient) -> None:
    big = {"model": "smollm2-135m-instruct", "prompt": "x" * 10_000}
    assert_error(client.post("/v1/completions", headers=AUTH, json=big), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for _ in range(10):
            yield b" " * 1000

    assert_error(client.post("/v1/completions", headers={**AUTH, "Content-Type": "application/json"}, content=chunks()), 413)


def test_create_job_defaults_and_group_size(client: TestClient) -> None:
    resp = client.post("/v1/quantization/jobs", headers=AUTH, json=TINY)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["object"] == "quantization.job" and job["status"] == "queued"
    assert job["model"] == "smollm2-135m-instruct" and job["hyperparameters"]["group_size"] == 64  # auto: 576 % 128 != 0
    assert job["result_model"] is None and job["result_files"] == []
    err = assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "group_size": 128}), 400, "invalid_group_size", "group_size")
    assert "576" in err["message"]
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "bits": 5}), 400, param="bits")
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "salient_ratio": 0.7}), 400, param="salient_ratio")
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "surprise": 1}), 400, param="surprise")
    assert job["hyperparameters"]["method"] == "awq" and job["hyperparameters"]["rounding_steps"] == 200
    learned = client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "method": "awq+round", "rounding_steps": 50})
    assert learned.status_code == 200, learned.text
    assert learned.json()["hyperparameters"]["method"] == "awq+round" and learned.json()["hyperparameters"]["rounding_steps"] == 50
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "method": "gptq"}), 400, param="method")
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "rounding_steps": 0}), 400, param="rounding_steps")


def test_job_sources_under_roots(client: TestClient, model_root: Path, tmp_path: Path) -> None:
    ok = client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": {"source": "path", "path": "tiny"}, "calibration": {"source": "text", "path": "calib.txt"}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["model"] == "tiny" and ok.json()["hyperparameters"]["group_size"] == 32  # 96 = 3 x 32
    assert "resolved" not in json.dumps(ok.json())  # server paths are not echoed
    for path in ("../outside", "tiny/../../outside", str(tmp_path / "outside"), "/etc", "link-out"):
        assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": {"source": "path", "path": path}}), 400, "path_not_allowed", "model.path")
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": {"source": "path", "path": "missing"}}), 400, "model_not_found", "model.path")
    assert_error(
        client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "calibration": {"source": "activations", "path": "../outside/config.json"}}),
        400, "path_not_allowed", "calibration.path",
    )
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": {"source": "path"}}), 400, param="model.path.path")


def test_idempotency_key(client: TestClient) -> None:
    h = {**AUTH, "Idempotency-Key": "abc-1"}
    first = client.post("/v1/quantization/jobs", headers=h, json=TINY)
    again = client.post("/v1/quantization/jobs", headers=h, json=dict(reversed(list(TINY.items()))))
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert_error(client.post("/v1/quantization/jobs", headers=h, json={**TINY, "bits": 8}), 422, "idempotency_key_reused", "Idempotency-Key")
    assert client.post("/v1/quantization/jobs", headers={**AUTH, "Idempotency-Key": "abc-2"}, json=TINY).json()["id"] != first.json()["id"]


def test_queue_bound_429(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/v1/quantization/jobs", headers=AUTH, json=TINY).status_code == 200
    resp = client.post("/v1/quantization/jobs", headers=AUTH, json=TINY)
    assert_error(resp, 429, "job_queue_full")
    assert resp.headers["retry-after"]


def test_job_lifecycle_routes_without_worker(client: TestClient, settings: Settings) -> None:
    ids = [client.post("/v1/quantization/jobs", headers=AUTH, json=TINY).json()["id"] for _ in range(3)]
    page = client.get("/v1/quantization/jobs", headers=AUTH, params={"limit": 2}).json()
    assert page["object"] == "list" and [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get("/v1/quantization/jobs", headers=AUTH, params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    assert_error(client.get("/v1/quantization/jobs", headers=AUTH, params={"after": "bogus"}), 400, "invalid_value", "after")

    job_id = ids[0]
    assert_error(client.get(f"/v1/quantization/jobs/{job_id}/result", headers=AUTH), 409, "job_not_succeeded")
    assert_error(client.delete(f"/v1/quantization/jobs/{job_id}", headers=AUTH), 409, "job_not_finished")
    cancelled = client.post(f"/v1/quantization/jobs/{job_id}/cancel", headers=AUTH).json()
    assert cancelled["status"] == "cancelled"
    events = client.get(f"/v1/quantization/jobs/{job_id}/events", headers=AUTH).json()
    assert [e["type"] for e in events["data"]] == ["created", "cancelled"]
    assert events["data"][0]["object"] == "quantization.job.event"
    tail = client.get(f"/v1/quantization/jobs/{job_id}/events", headers=AUTH, params={"after": events["data"][0]["id"]}).json()
    assert [e["type"] for e in tail["data"]] == ["cancelled"]

    # a succeeded job: written by "a worker" directly through the store
    store = open_store(settings.data_dir)
    done = store.claim("test-worker")
    folder = settings.data_dir / "jobs" / done.id
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    store.finish(done.id, "test-worker", "succeeded", result={"files": [{"filename": "config.json", "bytes": 2}, {"filename": "model.safetensors", "bytes": 7}], "stats": {}}, message="ok")
    got = client.get(f"/v1/quantization/jobs/{done.id}", headers=AUTH).json()
    assert got["status"] == "succeeded" and got["result_model"] == done.id
    assert [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]] == [*installed_builtin_models(), done.id]
    result = client.get(f"/v1/quantization/jobs/{done.id}/result", headers=AUTH)
    assert result.content == b"weights" and result.headers["content-length"] == "7"
    assert client.get(f"/v1/quantization/jobs/{done.id}/result", headers=AUTH, params={"file": "config.json"}).json() == {}
    assert_error(client.get(f"/v1/quantization/jobs/{done.id}/result", headers=AUTH, params={"file": "../jobs.sqlite3"}), 400, "invalid_file")
    assert_error(client.post(f"/v1/quantization/jobs/{done.id}/cancel", headers=AUTH), 409, "job_not_cancellable")
    deleted = client.delete(f"/v1/quantization/jobs/{done.id}", headers=AUTH).json()
    assert deleted == {"id": done.id, "object": "quantization.job", "deleted": True}
    assert not folder.exists()
    assert_error(client.get(f"/v1/quantization/jobs/{done.id}", headers=AUTH), 404, "job_not_found")
    assert_error(client.get("/v1/quantization/jobs/not-a-job", headers=AUTH), 404, "job_not_found")


def test_metrics_exposition(client: TestClient) -> None:
    client.post("/v1/quantization/jobs", headers=AUTH, json=TINY)
    client.get("/v1/models")  # 401
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'mm_http_requests_total{method="POST",route="/v1/quantization/jobs",status="200"} 1' in text
    assert 'mm_http_requests_total{method="GET",route="/v1/models",status="401"} 1' in text
    assert 'mm_jobs{status="queued"} 1' in text and "mm_job_queue_depth 1" in text
    assert "mm_worker_up 0" in text
    assert "# TYPE mm_worker_device_info gauge" in text and "mm_worker_device_info{" not in text  # no worker yet
    for name in ("mm_time_to_first_token_seconds", "mm_prompt_tokens_total", "mm_completion_tokens_total", "mm_inflight_generations"):
        assert f"# TYPE {name}" in text


def test_worker_device_in_health_and_metrics(client: TestClient) -> None:
    sup = client.app.state.mm.supervisor
    device = {"device": "gpu", "backend": "cuda", "device_name": 'NVIDIA "H200"\\x', "memory_bytes": 150 * 2**30}
    sup.ready_info = {"pid": 123, "jobs_enabled": True, "current_job": None, "loaded_models": [], "active_requests": 0, "device_info": device}
    sup.ready = True
    try:
        health = client.get("/health")
        assert health.status_code == 200, health.text
        worker = health.json()["worker"]
        assert worker["pid"] == 123 and worker["restarts"] == 0  # the fields that were there before
        assert (worker["device"], worker["backend"], worker["device_name"]) == ("gpu", "cuda", 'NVIDIA "H200"\\x')
        text = client.get("/metrics").text
        # parsed back, so label order (prometheus-client sorts) does not matter but escaping does
        device_info = [(s.labels, s.value) for f in text_string_to_metric_families(text) if f.name == "mm_worker_device_info" for s in f.samples]
        assert device_info == [({"device": "gpu", "backend": "cuda", "name": 'NVIDIA "H200"\\x'}, 1.0)], text
        assert re.search(r"^mm_worker_up 1\.0$", text, re.M), text
    finally:
        sup.ready = False


def test_no_auth_when_no_key(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "d"), start_worker=False)
    with TestClient(app) as c:
        assert c.get("/v1/models").status_code == 200


def test_service_does_not_import_mlx() -> None:
    code = (
        "import sys, service.app, service.main, service.openapi_export, jobstore, worker.sources, worker.protocol\n"
        "from service.app import create_app\n"
        "bad = [m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------
# Served models (--model NAME=PATH) and AutoAWQ export jobs
# ---------------------------------------------------------------------------------------
def test_served_model_entries_are_parsed_and_validated(tmp_path: Path, model_root: Path, monkeypatch, capsys) -> None:
    import os

    from metal_marlin import cli
    from service import main as service_main
    from worker.served import parse_served_models

    folder = model_root / "tiny"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert parse_served_models([f"mine={folder}", f"m.q4_v1={gguf}"]) == {"mine": folder, "m.q4_v1": gguf}
    assert parse_served_models(f"a={folder}{os.pathsep}{os.pathsep}b={gguf}") == {"a": folder, "b": gguf}  # MM_SERVED_MODELS form
    odd = tmp_path / "x=y"  # split at the first '='
    odd.mkdir()
    (odd / "config.json").write_text("{}")
    assert parse_served_models([f"eq={odd}"]) == {"eq": odd}
    assert parse_served_models(None) == {} and parse_served_models("") == {}
    bad = {
        "noequals": "must be NAME=PATH",
        f"={folder}": "must be NAME=PATH",
        f"has space={folder}": "is invalid",
        f"-dash={folder}": "is invalid",
        f"{'x' * 65}={folder}": "is invalid",
        f"a/b={folder}": "is invalid",
        f"smollm2-135m-instruct={folder}": "built-in model",
        f"qjob-0123={folder}": "must not start with 'qjob-'",
        f"QJOB-x={folder}": "must not start with 'qjob-'",
        f"gone={tmp_path / 'missing'}": "does not exist",
        f"noconfig={tmp_path}": "has no config.json",
        f"text={model_root / 'calib.txt'}": "neither a .gguf file nor a model folder",
    }
    for entry, message in bad.items():
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            parse_served_models([entry])
    with pytest.raises(ValueError, match="given twice"):
        parse_served_models([f"a={folder}", f"a={gguf}"])
    assert parse_served_models([f"gone={tmp_path / 'missing'}"], check_paths=False) == {"gone": tmp_path / "missing"}

    # Settings: MM_SERVED_MODELS, replaced by explicit entries (--model)
    monkeypatch.setenv("MM_SERVED_MODELS", f"env={folder}")
    assert list(Settings.from_env(data_dir=tmp_path / "d").served_models) == ["env"]
    assert list(Settings.from_env(data_dir=tmp_path / "d", served_models=[f"cli={gguf}"]).served_models) == ["cli"]
    monkeypatch.delenv("MM_SERVED_MODELS")

    # the command lines refuse a bad entry with one line and status 2, before starting anything
    assert cli.main(["serve", "--data-dir", str(tmp_path / "d"), "--model", f"gone={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metal-marlin: error: served model 'gone':") and err.count("\n") == 1, err
    assert service_main.main(["--data-dir", str(tmp_path / "d"), "--model", f"smollm2-135m-instruct={folder}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("service: error: served model name") and err.count("\n") == 1, err


def test_served_models_are_listed_and_requestable(tmp_path: Path, model_root: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_key=KEY, served_models=[f"tiny-local={model_root / 'tiny'}"])
    with TestClient(create_app(settings, start_worker=False)) as c:
        ids = [m["id"] for m in c.get("/v1/models", headers=AUTH).json()["data"]]
        assert ids == [*installed_builtin_models(), "tiny-local"]  # the built-ins first, the default at the head
        card = c.get("/v1/models/tiny-local", headers=AUTH).json()
        assert card["object"] == "model" and card["created"] > 0 and str(model_root) not in json.dumps(card)
        # known: gets as far as the (absent) worker; unknown names and paths are 404
        assert_error(c.post("/v1/completions", headers=AUTH, json={"model": "tiny-local", "prompt": "x"}), 503, "worker_unavailable")
        for name in ("other", str(model_root / "tiny"), "tiny"):
            assert_error(c.post("/v1/completions", headers=AUTH, json={"model": name, "prompt": "x"}), 404, "model_not_found", "model")
            assert_error(c.get(f"/v1/models/{name}", headers=AUTH), 404)


def test_autoawq_export_format_is_validated_at_submission(client: TestClient) -> None:
    err = assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "export_format": "autoawq", "bits": 3}), 422, "unsupported_export_format", "bits")
    assert err["type"] == "invalid_request_error" and "4" in err["message"]
    assert_error(
        client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "export_format": "autoawq", "salient_ratio": 0.01}),
        422, "unsupported_export_format", "salient_ratio",
    )
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "export_format": "gguf"}), 400, "invalid_value", "export_format")
    ok = client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "export_format": "autoawq"})
    assert ok.status_code == 200, ok.text
    job = ok.json()  # salient_ratio defaults to 0 with autoawq
    assert job["export_format"] == "autoawq" and job["hyperparameters"]["salient_ratio"] == 0.0
    assert job["result_formats"] == [] and job["autoawq_result_files"] == []
    plain = client.post("/v1/quantization/jobs", headers=AUTH, json=TINY).json()
    assert plain["export_format"] == "mlx" and plain["hyperparameters"]["salient_ratio"] == 0.01


def test_result_download_in_the_autoawq_format(client: TestClient, settings: Settings) -> None:
    from jobstore.layout import result_summary

    store = open_store(settings.data_dir)
    ids = {}
    for fmt in ("autoawq", "mlx"):
        job = client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "export_format": fmt}).json()
        claimed = store.claim("test-worker")
        assert claimed.id == job["id"]
        folder = settings.data_dir / "jobs" / claimed.id
        (folder / "autoawq" if fmt == "autoawq" else folder).mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"native")
        (folder / "config.json").write_text('{"quantization": {}}')
        if fmt == "autoawq":
            (folder / "autoawq" / "model.safetensors").write_bytes(b"autoawq!")
            (folder / "autoawq" / "config.json").write_text('{"quantization_config": {}}')
        store.finish(claimed.id, "test-worker", "succeeded", result=result_summary(folder), message="ok")
        ids[fmt] = claimed.id

    job = client.get(f"/v1/quantization/jobs/{ids['autoawq']}", headers=AUTH).json()
    assert job["result_formats"] == ["mlx", "autoawq"]
    assert [(f["filename"], f["bytes"]) for f in job["result_files"]] == [("config.json", 20), ("model.safetensors", 6)]
    assert [(f["filename"], f["bytes"]) for f in job["autoawq_result_files"]] == [("config.json", 27), ("model.safetensors", 8)]
    url = f"/v1/quantization/jobs/{ids['autoawq']}/result"
    awq = client.get(url, headers=AUTH, params={"format": "autoawq"})
    assert awq.content == b"autoawq!" and awq.headers["content-length"] == "8"
    assert f'filename="{ids["autoawq"]}-autoawq-model.safetensors"' in awq.headers["content-disposition"]
    assert client.get(url, headers=AUTH, params={"format": "autoawq", "file": "config.json"}).json() == {"quantization_config": {}}
    assert client.get(url, headers=AUTH).content == b"native"  # format=mlx is the default
    assert client.get(url, headers=AUTH, params={"format": "mlx"}).content == b"native"
    assert_error(client.get(url, headers=AUTH, params={"format": "autoawq", "file": "quant_stats.json"}), 400, "invalid_file", "file")
    assert_error(client.get(url, headers=AUTH, params={"format": "gguf"}), 400, param="format")

    plain = client.get(f"/v1/quantization/jobs/{ids['mlx']}", headers=AUTH).json()
    assert plain["result_formats"] == ["mlx"] and plain["autoawq_result_files"] == []
    assert_error(client.get(f"/v1/quantization/jobs/{ids['mlx']}/result", headers=AUTH, params={"format": "autoawq"}), 409, "format_not_available", "format")


def test_inflight_limit_follows_the_worker_batch_unless_set(monkeypatch) -> None:
    assert Settings().inflight_limit(None) == 32  # the worker has not said yet
    assert Settings().inflight_limit(16) == 32  # a CPU worker: as before
    assert Settings().inflight_limit(128) == 256  # a GPU worker batches 128
    assert Settings(max_inflight=5).inflight_limit(128) == 5
    monkeypatch.setenv("MM_MAX_INFLIGHT", "7")
    assert Settings.from_env().inflight_limit(128) == 7
    monkeypatch.setenv("MM_MAX_INFLIGHT", "0")
    with pytest.raises(ValueError, match="max_inflight"):
        Settings.from_env()
    monkeypatch.setenv("MM_MAX_INFLIGHT", "many")
    with pytest.raises(ValueError, match="MM_MAX_INFLIGHT"):
        Settings.from_env()


def test_generation_over_the_worker_derived_limit_is_429(client: TestClient) -> None:
    state = client.app.state.mm
    state.supervisor.ready_info = {"pid": 1, "max_batch_size": 2, "loaded_models": [], "active_requests": 0}
    state.supervisor.ready = True
    state.inflight = 4
    try:
        resp = client.post("/v1/completions", headers=AUTH, json={"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 2})
        err = assert_error(resp, 429, "too_many_requests")
        assert "limit 4" in err["message"] and resp.headers["Retry-After"] == "1"
    finally:
        state.supervisor.ready, state.inflight = False, 0
