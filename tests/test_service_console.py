"""The web console's files as the service serves them (no browser: see test_console_browser.py).

What must hold without a key: the page and its files load (they hold no data), the API does
not; no request path reaches a file outside the console's own table; unknown names are a 404
in the API's error shape; the files ship as package data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.console import CONSOLE_DIR, load_assets

KEY = "console-key"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings.from_env(data_dir=tmp_path / "data", api_key=KEY)
    with TestClient(create_app(settings, start_worker=False)) as c:
        yield c


def test_page_and_files_load_without_the_key_but_the_api_does_not(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'id="login-form"' in page.text and 'for="api-key"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    # every file the page references is served, with its type
    for name in re.findall(r'(?:href|src)="/console/([^"]+)"', page.text):
        resp = client.get(f"/console/{name}")
        assert resp.status_code == 200, name
    assert client.get("/console/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/console/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/v1/quantization/jobs").status_code == 401
    assert client.get("/v1/quantization/jobs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_every_module_import_resolves_to_a_served_file(client: TestClient) -> None:
    """The ES modules import each other by relative name: a typo would break the page at load."""
    served = set(load_assets())
    for path in CONSOLE_DIR.glob("*.js"):
        for name in re.findall(r'from "\./([^"]+)"', path.read_text(encoding="utf-8")):
            assert name in served, (path.name, name)


@pytest.mark.parametrize(
    "path",
    [
        "/console/../service/app.py",
        "/console/..%2fapp.py",
        "/console/%2e%2e%2f%2e%2e%2fpyproject.toml",
        "/console/..%5capp.py",
        "/console/app.py",
        "/console/.hidden.js",
        "/console/App.js",
        "/console/console.py",
        "/console//etc/passwd",
        "/console/%00.js",
    ],
)
def test_no_path_escapes_the_console_files(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 404, path
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["type"] == "not_found_error"


def test_revalidation_by_etag(client: TestClient) -> None:
    first = client.get("/console/app.js")
    assert first.headers["cache-control"] == "no-cache"
    again = client.get("/console/app.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_only_well_named_files_are_served(tmp_path: Path) -> None:
    (tmp_path / "ok.js").write_text("export {};")
    (tmp_path / "Bad.js").write_text("")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.js").write_text("")
    assert sorted(load_assets(tmp_path)) == ["ok.js"]
    assert load_assets(tmp_path / "missing") == {}


def test_console_files_are_package_data() -> None:
    """A non-editable install must ship the files (setuptools skips non-Python files otherwise)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    names = {p.name for p in CONSOLE_DIR.iterdir()}
    for name in names:
        assert any(Path("console", name).match(pattern) for pattern in patterns), name


def test_the_sse_parser_in_node() -> None:
    """sse.js, which every live view reads its streams with, on the cases a fetch() body brings:
    events split across chunks, CRLF line ends, keepalive comments, multi-line data, ids."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node to run the console's JavaScript outside a browser (apt-get install nodejs)")
    script = """
      import { parseSSE } from %s;
      const out = [];
      let rest = "";
      for (const chunk of ["id: qjev-1\\r\\ndata: {\\"a\\"", ":1}\\r\\n\\r", "\\n: keepalive\\n\\n", "data: x\\r", "\\ndata: y\\n\\nda", "ta: [DONE]\\n\\n"]) {
        const [events, left] = parseSSE(rest + chunk);
        out.push(...events);
        rest = left;
      }
      console.log(JSON.stringify({ out, rest }));
    """ % json.dumps((CONSOLE_DIR / "sse.js").as_uri())
    done = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "out": [{"id": "qjev-1", "data": '{"a":1}'}, {"id": None, "data": "x\ny"}, {"id": None, "data": "[DONE]"}],
        "rest": "",
    }
