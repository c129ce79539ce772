"""The worker's command on the ``metal-marlin`` command line: ``worker``.

Registered through the ``metal_marlin.commands`` entry point (see ``pyproject.toml``), so the
library's command line offers it without importing this package.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``worker`` to the ``metal-marlin`` subparsers ``sub``."""
    worker = sub.add_parser("worker", parents=parents, help="run a worker process on its own")
    worker.add_argument("--data-dir", required=True)
    worker.add_argument("--socket-path", default=None)
    worker.set_defaults(func=run_worker_command)


def run_worker_command(args: argparse.Namespace) -> int:
    from worker.main import run_worker

    run_worker(args.data_dir, args.socket_path)
    return 0
