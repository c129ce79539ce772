"""A quantization job's ``model`` given as a string, as OpenAI's jobs APIs take it.

A name is stored as the object it stands for, so every accepted string must give exactly the
job spec of its object form; every refused one gets an OpenAI-shaped error on ``model`` and
creates no job. In-process, without a worker (the same style as test_service_api.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from jobstore import JobStore
from jobstore.layout import result_dir
from service.app import create_app
from service.config import Settings
from test_service_api import AUTH, KEY, TINY, assert_error
from test_service_files import tiny_gguf

FLOAT_CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "head_dim": 16}


def model_folder(path: Path, **extra: Any) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**FLOAT_CONFIG, **extra}))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    model_folder(root / "tiny")
    model_folder(root / "quantized", quantization={"group_size": 32, "bits": 4})
    tiny_gguf(root / "tiny.gguf")
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    return model_folder(tmp_path / "elsewhere" / "float")


@pytest.fixture
def client(tmp_path: Path, root: Path, outside: Path) -> Iterator[TestClient]:
    served = [f"local={root / 'tiny'}", f"local-gguf={root / 'tiny.gguf'}", f"packed={root / 'quantized'}", f"outside={outside}"]
    settings = Settings(data_dir=tmp_path / "data", api_key=KEY, model_roots=str(root), served_models=served, max_queued_jobs=100)
    with TestClient(create_app(settings, start_worker=False)) as c:
        yield c


def store(client: TestClient) -> JobStore:
    return client.app.state.mm.store


def create(client: TestClient, model: Any):
    return client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": model})


def job_ids(client: TestClient) -> list[str]:
    return [job.id for job in store(client).list(limit=100)[0]]


def upload_model(client: TestClient, path: Path, purpose: str = "model") -> str:
    resp = client.post("/v1/files", headers=AUTH, files={"file": (path.name, path.read_bytes())}, data={"purpose": purpose})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def assert_same_job(client: TestClient, name: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Submit ``name`` and ``obj``: the stored specs and the API views (but ids and times) match."""
    by_name, by_object = create(client, name), create(client, obj)
    assert by_name.status_code == by_object.status_code == 200, (by_name.text, by_object.text)
    named, objected = by_name.json(), by_object.json()
    assert store(client).get(named["id"]).spec == store(client).get(objected["id"]).spec
    volatile = ("id", "created_at")
    assert {k: v for k, v in named.items() if k not in volatile} == {k: v for k, v in objected.items() if k not in volatile}
    return named


def test_builtin_name_is_the_builtin_source(client: TestClient) -> None:
    job = assert_same_job(client, "smollm2-135m-instruct", {"source": "builtin"})
    assert job["model"] == "smollm2-135m-instruct" and job["model_source"]["source"] == "builtin"
    assert store(client).get(job["id"]).spec["model"] == {"source": "builtin"}


@pytest.mark.parametrize(("name", "relative"), [("local", "tiny"), ("local-gguf", "tiny.gguf")])
def test_served_name_is_its_path_relative_to_its_root(client: TestClient, root: Path, name: str, relative: str) -> None:
    job = assert_same_job(client, name, {"source": "path", "path": relative})
    assert job["model"] == relative and job["model_source"] == {"source": "path", "path": relative, "file_id": None}
    assert str(root) not in json.dumps(job)  # the server's absolute path is not shown to clients
    assert store(client).get(job["id"]).spec["model"] == {"source": "path", "path": relative, "resolved": str((root / relative).resolve())}


def test_upload_id_is_the_file_source(client: TestClient, root: Path) -> None:
    file_id = upload_model(client, root / "tiny.gguf")
    job = assert_same_job(client, file_id, {"source": "file", "file_id": file_id})
    assert job["model"] == file_id and store(client).get(job["id"]).spec["model"] == {"source": "file", "file_id": file_id}


def test_served_name_shadowed_by_an_earlier_root_keeps_its_absolute_path(tmp_path: Path) -> None:
    """Relative paths are tried root by root: ``m`` would name the first root's model, not the served one."""
    first, second = model_folder(tmp_path / "a" / "m"), model_folder(tmp_path / "b" / "m", intermediate_size=128)
    settings = Settings(
        data_dir=tmp_path / "data", api_key=KEY, model_roots=os.pathsep.join([str(first.parent), str(second.parent)]),
        served_models=[f"second={second}"],
    )
    with TestClient(create_app(settings, start_worker=False)) as c:
        job = assert_same_job(c, "second", {"source": "path", "path": str(second.resolve())})
        assert store(c).get(job["id"]).spec["model"]["resolved"] == str(second.resolve())
        assert job["hyperparameters"]["group_size"] == 64  # second's widths (64, 128, 64); first's (64, 96, 64) give 32


def assert_refused(client: TestClient, model: Any, status: int, code: str, *, mentions: tuple[str, ...] = ()) -> dict[str, Any]:
    before = job_ids(client)
    err = assert_error(create(client, model), status, code, "model")
    for text in mentions:
        assert text in err["message"], err
    assert job_ids(client) == before
    return err


@pytest.mark.parametrize("name", ["gpt-4", "tiny", "/etc/passwd", "file-xyz", "qjob-" + "0" * 24, "LOCAL"])
def test_unknown_names_are_404_naming_what_is_accepted(client: TestClient, name: str) -> None:
    err = assert_refused(client, name, 404, "model_not_found", mentions=(repr(name), "smollm2-135m-instruct", "GET /v1/models", "file-", "source"))
    assert err["type"] == "not_found_error"


def test_a_job_id_is_refused_as_already_quantized(client: TestClient) -> None:
    job_id = create(client, "smollm2-135m-instruct").json()["id"]
    assert_refused(client, job_id, 400, "model_already_quantized", mentions=(job_id, "'smollm2-135m-instruct'"))  # queued: its result will be
    claimed = store(client).claim("test-worker")
    assert claimed is not None and claimed.id == job_id
    folder = result_dir(client.app.state.mm.settings.data_dir, job_id)  # "a worker" wrote the result
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text(json.dumps({**FLOAT_CONFIG, "quantization": {"group_size": 32, "bits": 4}}))
    store(client).finish(job_id, "test-worker", "succeeded", result={"files": [], "stats": {}}, message="ok")
    assert job_id in [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    err = assert_refused(client, job_id, 400, "model_already_quantized", mentions=(job_id, "'smollm2-135m-instruct'", "float"))
    assert err["type"] == "invalid_request_error"


def test_uploads_that_are_missing_or_not_models(client: TestClient, tmp_path: Path) -> None:
    assert_refused(client, "file-" + "0" * 24, 400, "file_not_found", mentions=("file-" + "0" * 24,))
    text = tmp_path / "calib.txt"
    text.write_text("Some text.\n\nMore text.\n")
    calibration = upload_model(client, text, purpose="calibration")
    assert_refused(client, calibration, 400, "invalid_file_purpose", mentions=(calibration, "'model'"))


def test_served_models_a_job_cannot_read(client: TestClient, outside: Path) -> None:
    err = assert_refused(client, "outside", 400, "path_not_allowed", mentions=("'outside'", "MM_MODEL_ROOTS"))
    assert str(outside) not in err["message"]
    assert_refused(client, "packed", 400, "model_already_quantized", mentions=("already quantized",))
    # the object form of the same folder is refused the same way, not left to fail in the worker
    assert_error(create(client, {"source": "path", "path": "quantized"}), 400, "model_already_quantized", "model.path")


@pytest.mark.parametrize("model", ["", "x" * 257, 5, None, {}, {"source": "name"}, {"source": "huggingface", "path": "x"}])
def test_values_that_are_neither_a_name_nor_a_source(client: TestClient, model: Any) -> None:
    assert_refused(client, model, 400, "invalid_value", mentions=("model name", "'builtin', 'path' or 'file'"))


def test_object_errors_keep_their_field_locations(client: TestClient) -> None:
    assert_error(create(client, {"source": "path"}), 400, "missing_required_parameter", "model.path.path")
    assert_error(create(client, {"source": "file", "file_id": "nope"}), 400, "invalid_value", "model.file.file_id")


def test_openapi_documents_the_string_form(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    model = doc["components"]["schemas"]["QuantizationJobCreate"]["properties"]["model"]
    alternatives = model["oneOf"]
    refs = [a["$ref"].rsplit("/", 1)[-1] for a in alternatives if "$ref" in a]
    strings = [a for a in alternatives if a.get("type") == "string"]
    assert refs == ["BuiltinModelSource", "PathModelSource", "FileModelSource"]
    assert len(strings) == 1 and strings[0]["minLength"] == 1 and "GET /v1/models" in strings[0]["description"]
    assert "404" in doc["paths"]["/v1/quantization/jobs"]["post"]["responses"]
