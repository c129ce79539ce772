"""Uploads (``/v1/files``) and live job events (SSE), in-process without a worker.

The multipart reader is checked on its own (every split of a body into chunks), then the
routes: purposes and content checks, the size limit (by Content-Length and while streaming),
nothing partial left on disk, jobs naming uploaded files, and the events stream.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jobstore import open_store
from service.app import create_app
from service.config import Settings
from service.files import clean_filename
from service.jobs import follow_events
from service.multipart import MultipartError, MultipartReader, PartData, PartEnd, PartStart, boundary_from_content_type

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TINY = {"n_samples": 2, "seq_len": 32, "n_grid": 2}
LIMIT = 64 * 1024


def tiny_gguf(path: Path) -> Path:
    """A metadata-only Llama GGUF (hidden 64, MLP 96, 4 heads): enough for the upload and job checks."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_feed_forward_length(96)
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_key=KEY, max_upload_bytes=LIMIT, max_body_bytes=4096)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, start_worker=False)) as c:
        yield c


def upload(client: TestClient, content: bytes, purpose: str = "calibration", filename: str = "calib.txt"):
    return client.post("/v1/files", headers=AUTH, files={"file": (filename, content)}, data={"purpose": purpose})


def assert_error(resp, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def stored(settings: Settings) -> list[str]:
    """Everything under <data>/files, temp folder included."""
    root = settings.data_dir / "files"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ---------------------------------------------------------------------------------------
# The multipart reader
# ---------------------------------------------------------------------------------------
BOUNDARY = b"----b0undary"
BODY = (
    b"preamble to ignore\r\n"
    b"------b0undary\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\ncalibration\r\n"
    b"------b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a b.txt\"\r\n"
    b"Content-Type: text/plain\r\n\r\nline one\r\n------b0undar not yet\r\n\r\n"
    b"------b0undary--\r\nepilogue"
)


def parse(chunks: list[bytes]) -> list:
    reader = MultipartReader(BOUNDARY)
    events = [e for chunk in chunks for e in reader.feed(chunk)]
    reader.close()
    merged: list = []
    for e in events:  # data may come in any number of pieces
        if isinstance(e, PartData) and merged and isinstance(merged[-1], PartData):
            merged[-1] = PartData(merged[-1].data + e.data)
        else:
            merged.append(e)
    return merged


def test_multipart_reader_any_chunking() -> None:
    expected = [
        PartStart("purpose", None, None), PartData(b"calibration"), PartEnd(),
        PartStart("file", "a b.txt", "text/plain"), PartData(b"line one\r\n------b0undar not yet\r\n"), PartEnd(),
    ]
    assert parse([BODY]) == expected
    for cut in range(1, len(BODY)):
        assert parse([BODY[:cut], BODY[cut:]]) == expected, cut
    assert parse([bytes([b]) for b in BODY]) == expected


def test_multipart_reader_errors() -> None:
    with pytest.raises(MultipartError):
        parse([BODY[: BODY.index(b"------b0undary--")]])  # no closing delimiter
    with pytest.raises(MultipartError):
        parse([b"------b0undary\r\nContent-Type: text/plain\r\n\r\nx\r\n------b0undary--"])  # no disposition
    with pytest.raises(MultipartError):
        parse([b"------b0undary\r\nContent-Disposition: form-data; name=\"f\"\r\n" + b"X-Pad: " + b"a" * 9000])
    assert boundary_from_content_type('multipart/form-data; boundary="abc"') == b"abc"
    for bad in ("application/json", "multipart/form-data", "multipart/form-data; boundary=" + "x" * 71):
        with pytest.raises(MultipartError):
            boundary_from_content_type(bad)


# ---------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------
def test_upload_list_get_download_delete(client: TestClient, settings: Settings) -> None:
    text = "First paragraph of calibration text.\n\nSecond paragraph, with ünïcode.\n".encode()
    resp = upload(client, text, filename="../../etc/passwd.txt")
    assert resp.status_code == 200, resp.text
    obj = resp.json()
    assert set(obj) == {"id", "object", "bytes", "created_at", "filename", "purpose"}
    assert obj["object"] == "file" and obj["bytes"] == len(text) and obj["purpose"] == "calibration"
    assert obj["filename"] == "passwd.txt" and obj["id"].startswith("file-")
    assert stored(settings) == [obj["id"]]  # the path is the id, never the client's name
    assert clean_filename("C:\\dir\\a\x00b\x1b.gguf") == "ab.gguf" and clean_filename("..") == ".." and clean_filename("/") == "upload"
    assert (settings.data_dir / "files" / obj["id"]).read_bytes() == text

    model = upload(client, tiny_gguf(settings.data_dir.parent / "m.gguf").read_bytes(), "model", "tiny.gguf").json()
    assert model["purpose"] == "model"
    listed = client.get("/v1/files", headers=AUTH).json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [model["id"], obj["id"]]
    assert listed["first_id"] == model["id"] and listed["last_id"] == obj["id"] and not listed["has_more"]
    page = client.get("/v1/files", headers=AUTH, params={"limit": 1, "order": "asc"}).json()
    assert [f["id"] for f in page["data"]] == [obj["id"]] and page["has_more"]
    rest = client.get("/v1/files", headers=AUTH, params={"limit": 1, "order": "asc", "after": obj["id"]}).json()
    assert [f["id"] for f in rest["data"]] == [model["id"]] and not rest["has_more"]
    assert [f["id"] for f in client.get("/v1/files", headers=AUTH, params={"purpose": "model"}).json()["data"]] == [model["id"]]

    assert client.get(f"/v1/files/{obj['id']}", headers=AUTH).json() == obj
    content = client.get(f"/v1/files/{obj['id']}/content", headers=AUTH)
    assert content.content == text and "passwd.txt" in content.headers["content-disposition"]

    assert client.delete(f"/v1/files/{obj['id']}", headers=AUTH).json() == {"id": obj["id"], "object": "file", "deleted": True}
    assert_error(client.get(f"/v1/files/{obj['id']}", headers=AUTH), 404, "file_not_found")
    assert_error(client.delete(f"/v1/files/{obj['id']}", headers=AUTH), 404, "file_not_found")
    assert_error(client.get("/v1/files/not-a-file", headers=AUTH), 404, "file_not_found")
    assert stored(settings) == [model["id"]]
    assert_error(client.get("/v1/files"), 401, "missing_api_key")


def test_openai_client_uploads(client: TestClient) -> None:
    openai = pytest.importorskip("openai")
    oai = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=KEY, http_client=client, max_retries=0)
    created = oai.files.create(file=("calib.txt", b"Some text.\n\nMore text.\n"), purpose="calibration")  # type: ignore[arg-type]
    assert created.object == "file" and created.bytes == 23 and created.filename == "calib.txt"
    assert [f.id for f in oai.files.list()] == [created.id]
    assert oai.files.retrieve(created.id).purpose == "calibration"
    assert oai.files.content(created.id).content == b"Some text.\n\nMore text.\n"
    assert oai.files.delete(created.id).deleted


def test_content_must_fit_the_purpose(client: TestClient, settings: Settings) -> None:
    assert_error(upload(client, b"not a gguf", "model", "m.gguf"), 400, "invalid_file", "file")
    assert_error(upload(client, b"GGUF\x03\x00\x00\x00truncated", "model", "m.gguf"), 400, "invalid_file", "file")
    assert_error(upload(client, b"\xff\xfe binary", "calibration"), 400, "invalid_file", "file")
    assert_error(upload(client, b"text\x00with NUL", "calibration"), 400, "invalid_file")
    assert_error(upload(client, b" \n\n ", "calibration"), 400, "invalid_file")
    assert_error(upload(client, b"", "calibration"), 400, "invalid_file")
    assert_error(upload(client, b"x", "fine-tune"), 400, "invalid_value", "purpose")
    assert_error(client.post("/v1/files", headers=AUTH, files={"file": ("a.txt", b"x")}), 400, "missing_required_parameter", "purpose")
    assert_error(client.post("/v1/files", headers=AUTH, data={"purpose": "calibration"}, files={"other": ("a", b"x")}), 400, "missing_required_parameter", "file")
    assert_error(client.post("/v1/files", headers=AUTH, json={"purpose": "calibration"}), 415, "unsupported_media_type")
    bad = client.post("/v1/files", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}, content=b"--xyz\r\nno end")
    assert_error(bad, 400, "invalid_multipart")
    # npz: only the allowed arrays, integer ids, no object arrays
    ids = np.arange(64, dtype=np.int32).reshape(2, 32)
    ok = upload(client, npz_bytes(input_ids=ids, hidden_states=np.zeros((2, 32, 8), np.float16)), filename="activations.npz")
    assert ok.status_code == 200, ok.text
    assert_error(upload(client, npz_bytes(input_ids=ids.astype(np.float32)), filename="a.npz"), 400, "invalid_file")
    assert_error(upload(client, npz_bytes(tokens=ids), filename="a.npz"), 400, "invalid_file")
    assert_error(upload(client, npz_bytes(input_ids=ids, hidden_states=np.zeros((2, 31, 8), np.float32)), filename="a.npz"), 400, "invalid_file")
    assert_error(upload(client, b"PK\x03\x04 not really a zip", filename="a.npz"), 400, "invalid_file")
    assert stored(settings) == [ok.json()["id"]]  # refused uploads leave nothing, not even in .tmp


class _Boom:
    """Unpickling this would create the marker file."""

    marker: Path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_npz_with_pickled_objects_is_never_unpickled(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    _Boom.marker = tmp_path / "unpickled"
    payload = np.empty(1, dtype=object)
    payload[0] = _Boom()
    err = assert_error(upload(client, npz_bytes(input_ids=payload), filename="evil.npz"), 400, "invalid_file")
    assert "object arrays" in err["message"]
    assert not _Boom.marker.exists() and stored(settings) == []


def test_upload_size_limit(client: TestClient, settings: Settings) -> None:
    big = b"word " * (LIMIT // 5 + 10)
    err = assert_error(upload(client, big), 413, "request_too_large")
    assert err["type"] == "invalid_request_error" and str(LIMIT) in err["message"]

    boundary = "streamedbody"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\ncalibration\r\n--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n\r\n'.encode()

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while streaming
        yield head
        for _ in range(LIMIT // 4096 + 2):
            yield b"a" * 4096
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = client.post("/v1/files", headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}, content=chunked())
    assert_error(resp, 413, "request_too_large", "file")
    assert stored(settings) == []
    # just under the limit is fine; the 1 KiB JSON limit of other routes does not apply to uploads
    ok = upload(client, b"a" * (LIMIT - 1))
    assert ok.status_code == 200 and ok.json()["bytes"] == LIMIT - 1
    assert_error(client.post("/v1/completions", headers=AUTH, json={"model": "m", "prompt": "x" * 5000}), 413)


def test_startup_drops_interrupted_and_unrecorded_uploads(settings: Settings) -> None:
    files = settings.data_dir / "files"
    (files / ".tmp").mkdir(parents=True)
    (files / ".tmp" / "file-000000000000000000000000.part").write_bytes(b"half")
    orphan = files / "file-0000000000000000000000aa"
    orphan.write_bytes(b"renamed, never recorded")
    with TestClient(create_app(settings, start_worker=False)) as c:
        kept = upload(c, b"recorded text").json()["id"]
    with TestClient(create_app(settings, start_worker=False)):
        pass
    assert stored(settings) == [kept]


def test_jobs_read_uploaded_files(client: TestClient, settings: Settings) -> None:
    model = upload(client, tiny_gguf(settings.data_dir.parent / "m.gguf").read_bytes(), "model", "tiny.gguf").json()["id"]
    text = upload(client, b"Calibration text.\n\nMore.\n").json()["id"]
    npz = upload(client, npz_bytes(input_ids=np.ones((2, 32), np.int32)), filename="act.npz").json()["id"]
    body = {**TINY, "model": {"source": "file", "file_id": model}, "calibration": {"source": "file", "file_id": text}}
    resp = client.post("/v1/quantization/jobs", headers=AUTH, json=body)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["model"] == model and job["model_source"] == {"source": "file", "path": None, "file_id": model}
    assert job["calibration"] == {"source": "file", "path": None, "file_id": text}
    assert job["hyperparameters"]["group_size"] == 32  # from the uploaded GGUF's widths: 96 = 3 x 32
    stored_spec = open_store(settings.data_dir).get(job["id"]).spec
    assert stored_spec["calibration"]["format"] == "text"
    with_npz = client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "calibration": {"source": "file", "file_id": npz}})
    assert with_npz.status_code == 200, with_npz.text

    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": {"source": "file", "file_id": text}}), 400, "invalid_file_purpose", "model.file_id")
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "calibration": {"source": "file", "file_id": model}}), 400, "invalid_file_purpose", "calibration.file_id")
    missing = "file-000000000000000000000000"
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": {"source": "file", "file_id": missing}}), 400, "file_not_found", "model.file_id")
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "model": {"source": "file", "file_id": "../jobs.sqlite3"}}), 400, param="model.file.file_id")
    assert_error(client.post("/v1/quantization/jobs", headers=AUTH, json={**TINY, "group_size": 64, "model": {"source": "file", "file_id": model}}), 400, "invalid_group_size")

    # a file that a queued job reads cannot be deleted until the job is over
    err = assert_error(client.delete(f"/v1/files/{model}", headers=AUTH), 409, "file_in_use")
    assert job["id"] in err["message"]
    assert client.post(f"/v1/quantization/jobs/{job['id']}/cancel", headers=AUTH).json()["status"] == "cancelled"
    assert client.delete(f"/v1/files/{model}", headers=AUTH).status_code == 200
    assert client.delete(f"/v1/files/{text}", headers=AUTH).status_code == 200
    assert_error(client.delete(f"/v1/files/{npz}", headers=AUTH), 409, "file_in_use")


# ---------------------------------------------------------------------------------------
# Job events as SSE
# ---------------------------------------------------------------------------------------
def sse(text: str) -> list[tuple[str | None, object]]:
    """``(id, data)`` per SSE event; data is JSON or the literal '[DONE]'; comments skipped."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "data" in fields:
            out.append((fields.get("id"), fields["data"] if fields["data"] == "[DONE]" else json.loads(fields["data"])))
    return out


def test_events_stream_of_a_finished_job_and_resume(client: TestClient) -> None:
    job_id = client.post("/v1/quantization/jobs", headers=AUTH, json=TINY).json()["id"]
    client.post(f"/v1/quantization/jobs/{job_id}/cancel", headers=AUTH)
    resp = client.get(f"/v1/quantization/jobs/{job_id}/events", headers=AUTH, params={"stream": "true"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse(resp.text)
    assert [e[1]["type"] for e in events[:-1]] == ["created", "cancelled"] and events[-1] == (None, "[DONE]")
    assert all(eid == data["id"] for eid, data in events[:-1])
    first = events[0][0]
    resumed = sse(client.get(f"/v1/quantization/jobs/{job_id}/events", headers=AUTH, params={"stream": "true", "after": first}).text)
    assert [e[1]["type"] for e in resumed[:-1]] == ["cancelled"] and resumed[-1][1] == "[DONE]"
    by_header = client.get(f"/v1/quantization/jobs/{job_id}/events", headers={**AUTH, "Accept": "text/event-stream", "Last-Event-ID": first})
    assert sse(by_header.text) == resumed
    listed = client.get(f"/v1/quantization/jobs/{job_id}/events", headers={**AUTH, "Accept": "application/json"}).json()
    assert [e["id"] for e in listed["data"]] == [e[0] for e in events[:-1]]
    assert client.get(f"/v1/quantization/jobs/{job_id}/events", headers={**AUTH, "Accept": "text/event-stream"}, params={"stream": "false"}).json()["object"] == "list"
    assert_error(client.get(f"/v1/quantization/jobs/{job_id}/events", headers=AUTH, params={"stream": "true", "after": "bogus"}), 400, param="after")
    assert_error(client.get("/v1/quantization/jobs/qjob-000000000000000000000000/events", headers=AUTH, params={"stream": "true"}), 404, "job_not_found")


def test_follow_events_streams_as_they_are_written(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    job, _ = store.create_job({"model": {"source": "builtin"}, "hyperparameters": {}})
    store.claim("w1")

    def worker() -> None:  # another thread (the worker's role) writes while the stream is open
        for block in (1, 2, 3):
            time.sleep(0.15)
            store.record_progress(job.id, "w1", {"stage": "quantizing", "block": block, "n_blocks": 3, "elapsed_s": 0.0}, f"Block {block}/3")
        time.sleep(0.3)
        store.finish(job.id, "w1", "succeeded", result={"files": [], "stats": {}}, message="Job succeeded")

    async def consume() -> list[tuple[float, bytes]]:
        got = []
        async for chunk in follow_events(store, job.id, None, poll_s=0.02, keepalive_s=0.2):
            got.append((time.monotonic(), chunk))
        return got

    thread = threading.Thread(target=worker)
    thread.start()
    started = time.monotonic()
    chunks = asyncio.run(consume())
    thread.join()
    body = b"".join(c for _, c in chunks).decode()
    events = sse(body)
    assert [e[1]["type"] for e in events[:-1]] == ["created", "started", "progress", "progress", "progress", "succeeded"]
    assert events[-1][1] == "[DONE]" and ": keepalive" in body  # 0.3 s without events > keepalive 0.2 s
    at = {json.loads(c.decode().split("data: ", 1)[1])["data"]["block"]: t - started for t, c in chunks if b'"progress"' in c}
    assert at[1] < at[3] - 0.2  # each was sent when written, not all at the end

    # deleted mid-stream: an error event ends it
    other, _ = store.create_job({"model": {"source": "builtin"}, "hyperparameters": {}})

    async def consume_deleted() -> str:
        out = []
        async for chunk in follow_events(store, other.id, None, poll_s=0.02):
            out.append(chunk)
            if len(out) == 1:
                store.request_cancel(other.id)
                store.delete(other.id)
        return b"".join(out).decode()

    text = asyncio.run(consume_deleted())
    assert '"type":"created"' in text and '"code": "job_not_found"' in text and "[DONE]" not in text


def test_files_path_with_a_trailing_slash_is_the_same_endpoint(client: TestClient, settings: Settings) -> None:
    """``POST /v1/files/`` uploads (with the upload limit, not the 4 KiB JSON one) and
    ``GET /v1/files/`` lists, exactly as without the slash: no redirect, nothing lost."""
    text = b"calibration " * 1000  # 12 KB: over the JSON body limit of these tests
    resp = client.post("/v1/files/", headers=AUTH, files={"file": ("c.txt", text)}, data={"purpose": "calibration"}, follow_redirects=False)
    assert resp.status_code == 200, resp.text
    obj = resp.json()
    assert obj["bytes"] == len(text) and (settings.data_dir / "files" / obj["id"]).read_bytes() == text
    listed = client.get("/v1/files/", headers=AUTH, follow_redirects=False)
    assert listed.status_code == 200 and [f["id"] for f in listed.json()["data"]] == [obj["id"]]
    assert_error(client.post("/v1/files/", files={"file": ("c.txt", text)}, data={"purpose": "calibration"}), 401)
