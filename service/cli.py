"""The service's commands on the ``metal-marlin`` command line: ``serve`` and ``openapi``.

Registered through the ``metal_marlin.commands`` entry point (see ``pyproject.toml``), so the
library's command line offers them without importing this package. Nothing heavy is imported
until a command runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and ``openapi`` to the ``metal-marlin`` subparsers ``sub``."""
    serve = sub.add_parser("serve", parents=parents, help="start the HTTP service (supervises its own worker)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", default=None, help="default: $MM_DATA_DIR or ./data")
    serve.add_argument("--model", dest="served_models", action="append", default=None, metavar="NAME=PATH",
                       help="also serve a local .gguf file, HF/MLX folder, quantized or AutoAWQ GEMM folder under NAME "
                       "(repeatable; replaces $MM_SERVED_MODELS, which holds NAME=PATH entries separated by os.pathsep)")
    # the service never loads MLX: the worker it starts selects the device
    serve.set_defaults(func=run_serve, device_mode="export")

    openapi = sub.add_parser("openapi", parents=parents, help="write openapi/openapi.json from the app")
    openapi.add_argument("--output", default=None)
    openapi.set_defaults(func=run_openapi, device_mode="none")


def run_serve(args: argparse.Namespace) -> int:
    from service.main import serve

    serve(host=args.host, port=args.port, data_dir=args.data_dir, served_models=args.served_models)
    return 0


def run_openapi(args: argparse.Namespace) -> int:
    from service.openapi_export import write_openapi

    path = write_openapi(args.output) if args.output else write_openapi()
    print(f"wrote {path}")
    return 0
