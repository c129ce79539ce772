"""openapi/openapi.json stays in sync with the app; schemathesis fuzzes the app in-process.

Regenerate the document with ``python -m service.openapi_export`` (or the CLI's
``metal-marlin openapi``). The fuzz run uses the app without a worker: generation routes
answer their documented 503, everything else runs for real against a temporary data dir.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from service.app import create_app
from service.config import Settings
from service.openapi_export import DEFAULT_PATH, openapi_document, render_openapi, write_openapi

KEY = "fuzz-key"


def test_openapi_json_is_up_to_date() -> None:
    assert DEFAULT_PATH.is_file(), "openapi/openapi.json is missing: run python -m service.openapi_export"
    committed = DEFAULT_PATH.read_text(encoding="utf-8")
    assert committed == render_openapi(), "openapi/openapi.json is stale: run python -m service.openapi_export"


def test_openapi_document_covers_the_api(tmp_path: Path) -> None:
    doc = openapi_document()
    paths = doc["paths"]
    for path, method in [
        ("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"),
        ("/v1/quantization/jobs", "post"), ("/v1/quantization/jobs", "get"), ("/v1/quantization/jobs/{job_id}", "get"),
        ("/v1/quantization/jobs/{job_id}", "delete"), ("/v1/quantization/jobs/{job_id}/cancel", "post"),
        ("/v1/quantization/jobs/{job_id}/events", "get"), ("/v1/quantization/jobs/{job_id}/result", "get"),
        ("/v1/files", "post"), ("/v1/files", "get"), ("/v1/files/{file_id}", "get"), ("/v1/files/{file_id}", "delete"),
        ("/v1/files/{file_id}/content", "get"),
        ("/health", "get"), ("/metrics", "get"),
    ]:
        assert method in paths[path], (path, method)
    # every error response is documented with the one error shape, never FastAPI's 422 body
    for path, ops in paths.items():
        for op in ops.values():
            assert "422" not in op["responses"] or path == "/v1/quantization/jobs", path
            for status, resp in op["responses"].items():
                if status.startswith(("4", "5")) and path != "/health":
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), (path, status)
    upload = paths["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["file", "purpose"] and upload["properties"]["file"]["format"] == "binary"
    assert "text/event-stream" in paths["/v1/quantization/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    sources = json.dumps(doc["components"]["schemas"]["QuantizationJobCreate"]) + json.dumps(doc["components"]["schemas"])
    assert "FileModelSource" in sources and "FileCalibration" in sources
    out = write_openapi(tmp_path / "openapi.json")
    assert json.loads(out.read_text()) == doc


schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

_DATA = Path(tempfile.mkdtemp(prefix="mm-fuzz-"))
_APP = create_app(Settings(data_dir=_DATA / "data", api_key=KEY, model_roots=str(_DATA)), start_worker=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> None:
    yield
    shutil.rmtree(_DATA, ignore_errors=True)


def no_unexpected_server_error(ctx, response, case) -> None:  # noqa: ANN001 - schemathesis check signature
    """5xx only as documented: 503 from generation routes while there is no worker."""
    documented = {"/v1/completions", "/v1/chat/completions", "/health"}
    if response.status_code >= 500 and not (response.status_code == 503 and case.path in documented):
        raise AssertionError(f"{case.method} {case.path} answered {response.status_code}: {response.text[:300]}")


# Operations with rules a JSON schema cannot state, documented as 400s: a job's paths must
# exist under the model roots and its group size divide the model's widths; a completion's
# prompts x n are bounded and echo excludes logprobs; an upload's content must fit its
# purpose (a GGUF model, UTF-8 text or an npz). Schema-valid bodies may fail those.
SEMANTIC_400 = {("POST", "/v1/quantization/jobs"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/files")}


#: One pytest test per operation (not schemathesis' own ``schema.parametrize()``, whose
#: per-operation runs are subtests: under pytest-xdist only a few of them ran).
OPERATIONS = [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_api_conforms_to_its_schema(operation) -> None:  # noqa: ANN001
    excluded = [not_a_server_error]
    if (operation.method.upper(), operation.path) in SEMANTIC_400:
        excluded.append(positive_data_acceptance)

    # 80 examples per operation: about the number of calls schema.parametrize() made in one
    # process with its coverage phase (1,454 for 18 operations), which this API does not run
    @given(case=operation.as_strategy())
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def conforms(case) -> None:  # noqa: ANN001
        case.call_and_validate(
            headers={"Authorization": f"Bearer {KEY}"},
            excluded_checks=excluded,
            additional_checks=[no_unexpected_server_error],
        )

    conforms()


def test_every_operation_of_the_document_is_fuzzed() -> None:
    assert len(OPERATIONS) == sum(len(methods) for methods in _APP.openapi()["paths"].values()) >= 18
