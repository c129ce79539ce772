"""Write the service's OpenAPI document: ``write_openapi(path)``."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the app (no worker is started, no data directory is kept)."""
    from service.app import create_app
    from service.config import Settings

    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(data_dir=Path(tmp), api_key="unused"), start_worker=False)
        document = app.openapi()
        app.state.mm.store.close()
    return document


def render_openapi() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_openapi(path: str | os.PathLike[str] = DEFAULT_PATH) -> Path:
    """Write the document (stable formatting: sorted keys, 2-space indent) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_openapi(), encoding="utf-8")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(write_openapi(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_PATH))
