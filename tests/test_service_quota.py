"""Per-key job limits and the storage quota, in-process without a worker.

Each test sends the request that passes a limit and checks the status, the OpenAI-shaped
body, and that nothing was created or written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jobstore import open_store
from jobstore.layout import data_bytes, files_dir
from service.app import create_app
from service.auth import key_owner
from service.config import Settings
from test_service_api import TINY, assert_error

ALICE, BOB = "alice-key", "bob-key"


def _client(tmp_path: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path / "data", api_key=f"{ALICE}, {BOB}", **settings), start_worker=False))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with _client(tmp_path, max_jobs_per_key=2, max_queued_jobs=10) as c:
        yield c


def _submit(client: TestClient, key: str):
    return client.post("/v1/quantization/jobs", headers={"Authorization": f"Bearer {key}"}, json=TINY)


def test_each_listed_key_is_accepted_and_a_wrong_one_is_not(client: TestClient) -> None:
    for key in (ALICE, BOB):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert_error(client.get("/v1/models", headers={"Authorization": f"Bearer {ALICE},{BOB}"}), 401, "invalid_api_key")


def test_per_key_job_limit_is_429_for_that_key_only(client: TestClient, tmp_path: Path) -> None:
    first = [_submit(client, ALICE).json()["id"] for _ in range(2)]
    resp = _submit(client, ALICE)
    err = assert_error(resp, 429, "too_many_jobs")
    assert "limit 2" in err["message"] and resp.headers["retry-after"] == "30"
    store = open_store(tmp_path / "data")
    assert store.counts()["queued"] == 2  # the refused job was not created
    assert {store.get(j).owner for j in first} == {key_owner(ALICE)}  # a digest, never the key
    assert ALICE not in (tmp_path / "data" / "jobs.sqlite3").read_bytes().decode("latin-1")
    assert _submit(client, BOB).status_code == 200  # another key has its own allowance
    client.post(f"/v1/quantization/jobs/{first[0]}/cancel", headers={"Authorization": f"Bearer {ALICE}"})
    assert _submit(client, ALICE).status_code == 200  # a finished job frees a place


def test_a_job_is_refused_with_507_when_the_quota_is_used_up(tmp_path: Path) -> None:
    with _client(tmp_path, max_data_bytes=1000) as client:
        files_dir(tmp_path / "data").mkdir(parents=True, exist_ok=True)
        (files_dir(tmp_path / "data") / "old-upload").write_bytes(b"x" * 1000)
        err = assert_error(_submit(client, ALICE), 507, "storage_quota_exceeded")
        assert err["type"] == "insufficient_storage_error" and "1000 bytes" in err["message"]
        assert open_store(tmp_path / "data").counts()["queued"] == 0
        assert str(tmp_path) not in err["message"]


def test_the_quota_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="max_data_bytes"):
        Settings(data_dir=Path("d"), max_data_bytes=0)
    with pytest.raises(ValueError, match="max_jobs_per_key"):
        Settings(data_dir=Path("d"), max_jobs_per_key=0)
    assert data_bytes(Path("does-not-exist")) == 0


def _upload(client: TestClient, content: bytes):
    return client.post("/v1/files", headers={"Authorization": f"Bearer {ALICE}"}, files={"file": ("calib.txt", content)}, data={"purpose": "calibration"})


def test_an_upload_past_the_quota_is_507_and_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with _client(tmp_path, max_data_bytes=10_000) as client:
        kept = _upload(client, b"First paragraph.\n\nSecond one.\n" * 100)  # about 3 KB: fits
        assert kept.status_code == 200, kept.text
        before = data_bytes(data)
        err = assert_error(_upload(client, b"word " * 2_000), 507, "storage_quota_exceeded")  # 10 KB more: does not
        assert "10000 bytes" in err["message"] and str(tmp_path) not in err["message"]
        assert data_bytes(data) == before  # nothing half-written, the temp file is gone
        assert not list((files_dir(data) / ".tmp").iterdir())
        listed = client.get("/v1/files", headers={"Authorization": f"Bearer {ALICE}"}).json()["data"]
        assert [f["id"] for f in listed] == [kept.json()["id"]]
        # deleting frees the space again
        client.delete(f"/v1/files/{kept.json()['id']}", headers={"Authorization": f"Bearer {ALICE}"})
        assert _upload(client, b"word " * 1_500).status_code == 200


def test_error_bodies_name_no_server_path(tmp_path: Path) -> None:
    from service.errors import error_body

    with _client(tmp_path, model_roots=str(tmp_path / "models")):
        body = error_body(f"cannot read the model: [Errno 2] '{tmp_path / 'models' / 'tiny' / 'config.json'}' and {tmp_path / 'data' / 'files'}", "invalid_request_error")
    assert body["error"]["message"] == "cannot read the model: [Errno 2] '<models>/tiny/config.json' and <data>/files"
