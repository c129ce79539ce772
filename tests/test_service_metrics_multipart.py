"""The metrics and multipart modules on their libraries (prometheus-client, python-multipart).

What the service relies on beyond test_service_api.py / test_service_files.py: the exposed
names stay exactly the service's (no ``_created`` series, no doubled ``_total``), each app has
a registry of its own, scrape-time gauges are read at each scrape and a failing source does
not break /metrics; the reader skips a preamble, reports malformed bodies by name, and the
upload route answers 400 with nothing left on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.config import Settings
from service.metrics import CONTENT_TYPE, ServiceMetrics
from service.multipart import MultipartError, MultipartReader, PartData, PartEnd, PartStart

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}

EXPECTED_FAMILIES = {
    "mm_http_requests_total": "counter",
    "mm_http_request_duration_seconds": "histogram",
    "mm_generation_requests_total": "counter",
    "mm_prompt_tokens_total": "counter",
    "mm_completion_tokens_total": "counter",
    "mm_time_to_first_token_seconds": "histogram",
    "mm_inflight_generations": "gauge",
    "mm_rejected_requests_total": "counter",
    "mm_worker_restarts_total": "counter",
    "mm_jobs": "gauge",
    "mm_job_queue_depth": "gauge",
    "mm_worker_up": "gauge",
    "mm_worker_device_info": "gauge",
    "mm_worker_cancel_lag_steps": "gauge",
    "mm_worker_cancel_lag_steps_max": "gauge",
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def declared(text: str) -> dict[str, str]:
    """The ``# TYPE`` lines, name to type, as a scraper reads them."""
    types = [line.split() for line in text.splitlines() if line.startswith("# TYPE ")]
    return {name: kind for _, _, name, kind in types}


# ---------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------
def test_exposed_names_types_and_values() -> None:
    m = ServiceMetrics()
    m.requests.inc(method="GET", route="/v1/models", status="200")
    m.requests.inc(method="GET", route="/v1/models", status="200")
    m.request_seconds.observe(0.02, route="/v1/models")
    m.prompt_tokens.inc(7, model="tiny")
    m.worker_restarts.inc()
    m.inflight.set(3)
    text = m.render()
    assert declared(text) == EXPECTED_FAMILIES  # in particular no `_created` gauges, no `_total_total`
    assert "_created" not in text
    got = samples(text)
    assert got[("mm_http_requests_total", (("method", "GET"), ("route", "/v1/models"), ("status", "200")))] == 2
    assert got[("mm_worker_restarts_total", ())] == 1 and got[("mm_prompt_tokens_total", (("model", "tiny"),))] == 7
    assert got[("mm_inflight_generations", ())] == 3
    assert got[("mm_http_request_duration_seconds_bucket", (("le", "0.025"), ("route", "/v1/models")))] == 1
    assert got[("mm_http_request_duration_seconds_bucket", (("le", "0.01"), ("route", "/v1/models")))] == 0
    assert got[("mm_http_request_duration_seconds_count", (("route", "/v1/models"),))] == 1
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    with pytest.raises(ValueError):
        m.requests.inc(method="GET")  # labels must all be given, as before


def test_each_instance_counts_alone() -> None:
    """Several apps in one process (the tests make many) must neither clash nor share values."""
    a, b = ServiceMetrics(), ServiceMetrics()
    a.worker_restarts.inc()
    assert samples(a.render())[("mm_worker_restarts_total", ())] == 1
    assert samples(b.render())[("mm_worker_restarts_total", ())] == 0
    assert "mm_worker_restarts_total" not in prometheus_client.generate_latest().decode()  # the global registry stays clean


def test_scrape_time_gauges() -> None:
    counts = {"queued": 2, "running": 1}
    up = [False]
    device: list[dict[str, str | None] | None] = [None]
    m = ServiceMetrics(job_counts=lambda: dict(counts), worker_up=lambda: up[0], worker_device=lambda: device[0])
    got = samples(m.render())
    assert got[("mm_jobs", (("status", "queued"),))] == 2 and got[("mm_job_queue_depth", ())] == 2
    assert got[("mm_worker_up", ())] == 0
    assert not [k for k in got if k[0] == "mm_worker_device_info"]  # no worker has answered yet
    counts["queued"] = 0  # read again at the next scrape, not cached
    up[0] = True
    device[0] = {"device": "gpu", "backend": "metal", "device_name": None}
    got = samples(m.render())
    assert got[("mm_job_queue_depth", ())] == 0 and got[("mm_worker_up", ())] == 1
    assert got[("mm_worker_device_info", (("backend", "metal"), ("device", "gpu"), ("name", "")))] == 1


def test_cancellation_lag_comes_from_the_workers_scheduler_stats() -> None:
    generation: list[dict | None] = [None]
    m = ServiceMetrics(worker_generation=lambda: generation[0])
    assert not [k for k in samples(m.render()) if k[0].startswith("mm_worker_cancel_lag")]  # no worker answer yet
    generation[0] = {"cancelled": 5, "cancel_lag_steps_hist": {"0": 1, "1": 3, "2": 0, ">2": 1}, "cancel_lag_steps_max": 4}
    got = samples(m.render())
    assert [got[("mm_worker_cancel_lag_steps", (("steps", k),))] for k in ("0", "1", "2", ">2")] == [1, 3, 0, 1]
    assert got[("mm_worker_cancel_lag_steps_max", ())] == 4


def test_a_failing_source_does_not_break_the_scrape() -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("store is locked")

    m = ServiceMetrics(job_counts=broken, worker_up=lambda: True)
    text = m.render()
    got = samples(text)
    assert "# TYPE mm_jobs gauge" in text and not [k for k in got if k[0] in ("mm_jobs", "mm_job_queue_depth")]
    assert got[("mm_worker_up", ())] == 1


# ---------------------------------------------------------------------------------------
# Multipart
# ---------------------------------------------------------------------------------------
def read_all(boundary: bytes, chunks: list[bytes]) -> list:
    reader = MultipartReader(boundary)
    events = [e for c in chunks for e in reader.feed(c)]
    reader.close()
    merged: list = []
    for e in events:
        if isinstance(e, PartData) and merged and isinstance(merged[-1], PartData):
            merged[-1] = PartData(merged[-1].data + e.data)
        else:
            merged.append(e)
    return merged


def test_reader_skips_a_preamble_with_boundary_lookalikes() -> None:
    body = (
        b"a preamble: --bnd in mid-line\r\n--bn is shorter\r\n"
        b"--bnd\r\nContent-Disposition: form-data; name=\"file\"; filename=\"\xe2\x82\xac.txt\"\r\n\r\n"
        b"x\r\n--bnd--\r\nepilogue --bnd\r\n"
    )
    expected = [PartStart("file", "\u20ac.txt", None), PartData(b"x"), PartEnd()]
    for cut in range(1, len(body)):
        assert read_all(b"bnd", [body[:cut], body[cut:]]) == expected, cut


def test_reader_names_the_problem() -> None:
    cases = {
        b"--bnd\r\n\r\nno headers\r\n--bnd--": "Content-Disposition",
        b"--bnd\r\nContent-Disposition: form-data\r\n\r\nx\r\n--bnd--": "no field name",
        b"--bnd\r\nContent-Disposition: attachment; name=\"f\"\r\n\r\nx\r\n--bnd--": "Content-Disposition",
        b"--bndX\r\n": "boundary",
        b"--bnd\r\nBad Header: x\r\n\r\n": "invalid character",
        b"--bnd\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(9)) + b"\r\n": "header count",
    }
    for body, words in cases.items():
        with pytest.raises(MultipartError, match=words):
            read_all(b"bnd", [body])
    with pytest.raises(MultipartError, match="closing boundary"):
        read_all(b"bnd", [b"preamble without any delimiter"])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_key=KEY, max_upload_bytes=1 << 20)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, start_worker=False)) as c:
        yield c


def test_malformed_upload_is_a_named_400_and_leaves_nothing(client: TestClient, settings: Settings) -> None:
    body = (
        b'--bnd\r\nContent-Disposition: form-data; name="purpose"\r\n\r\ncalibration\r\n'
        b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nsome text'
        b"\r\n--bnd\r\nContent-Type: text/plain\r\n\r\nno disposition\r\n--bnd--\r\n"
    )
    resp = client.post("/v1/files", headers={**AUTH, "Content-Type": "multipart/form-data; boundary=bnd"}, content=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["code"] == "invalid_multipart" and "Content-Disposition" in err["message"]
    root = settings.data_dir / "files"
    assert [p for p in root.rglob("*") if p.is_file()] == []  # the half-written temp file is gone
    assert client.get("/v1/files", headers=AUTH).json()["data"] == []
