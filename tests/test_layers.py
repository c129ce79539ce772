"""The packages' import arrows run one way: the library knows nothing of the layers on it.

``metal_marlin`` (the library) imports none of ``jobstore``, ``service``, ``worker``;
``jobstore`` imports neither the service, the worker, MLX nor FastAPI; the service never
imports MLX. Checked on the source (every import statement, lazy ones inside functions
included), so a new arrow the wrong way fails here before it ships.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "metal_marlin": {"jobstore", "service", "worker", "fastapi", "uvicorn"},
    "jobstore": {"metal_marlin", "service", "worker", "mlx", "fastapi", "uvicorn", "numpy"},
    "service": {"mlx", "metal_marlin.pipeline", "metal_marlin.generate", "metal_marlin.models"},
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _violations(package: str) -> list[str]:
    banned = FORBIDDEN[package]
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                out.append(f"{path.relative_to(ROOT)} imports {name}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_against_the_layering(package: str) -> None:
    assert _violations(package) == []


def test_the_checker_sees_a_lazy_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from service.main import serve\n    import worker.main\n", encoding="utf-8")
    assert _imports(module) == ["service.main", "worker.main"]


def test_the_service_and_worker_commands_reach_the_library_command_line() -> None:
    from metal_marlin.cli import build_parser

    parser = build_parser()
    for argv, func in ((["serve", "--port", "9"], "run_serve"), (["worker", "--data-dir", "d"], "run_worker_command"), (["openapi"], "run_openapi")):
        args = parser.parse_args(argv)
        assert args.func.__name__ == func
    assert parser.parse_args(["serve"]).device_mode == "export"
    assert parser.parse_args(["openapi"]).device_mode == "none"
