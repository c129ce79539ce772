"""Give MLX's CPU backend a fast BLAS on Linux.

The Linux ``mlx[cpu]`` wheel links a bundled reference BLAS: its float32 matmul runs at a
few GFLOP/s, which makes calibration forwards and the AWQ search crawl. MLX resolves
``cblas_sgemm`` dynamically, so loading an optimised OpenBLAS into the global symbol scope
*before* ``mlx.core`` is first used interposes it (measured here: ~3 -> ~120 GFLOP/s,
identical results). This module does that once, on import, and is imported by
``metal_marlin/__init__.py`` before anything touches MLX. macOS uses Metal/Accelerate and is
left alone.

Override with ``MM_BLAS_LIBRARY=/path/to/libopenblas.so.0``; disable with ``MM_BLAS_LIBRARY=none``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "libopenblas.so.0",  # Debian/Ubuntu: libopenblas0-pthread (installed by scripts/bootstrap.sh)
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

loaded_blas: str | None = None
"""Path or soname of the BLAS that was interposed, or None (reference BLAS in use)."""


def _load() -> str | None:
    if not sys.platform.startswith("linux"):
        return None
    choice = os.environ.get("MM_BLAS_LIBRARY", "").strip()
    if choice.lower() == "none":
        return None
    candidates = (choice,) if choice else _CANDIDATES
    for name in candidates:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return name
    found = ctypes.util.find_library("openblas")
    if found and not choice:
        try:
            ctypes.CDLL(found, mode=ctypes.RTLD_GLOBAL)
            return found
        except OSError:
            return None
    return None


loaded_blas = _load()
