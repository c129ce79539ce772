"""Small process helpers shared by the worker and the service (no MLX)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, expected_parent: int | None = None) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux).

    Elsewhere (macOS) :func:`watch_parent` does the same by polling. If the parent is already
    gone (it died before this ran) the signal is raised at once.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except OSError:
            pass
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)


def watch_parent(expected_parent: int, on_gone: Callable[[], None], interval_s: float = 1.0) -> threading.Thread:
    """Call ``on_gone`` (in a daemon thread) once the parent process is no longer ``expected_parent``."""

    def loop() -> None:
        while os.getppid() == expected_parent:
            time.sleep(interval_s)
        on_gone()

    thread = threading.Thread(target=loop, name="parent-watch", daemon=True)
    thread.start()
    return thread


def describe_exit(returncode: int) -> str:
    """'exited with status 3' / 'was killed by SIGKILL'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"
