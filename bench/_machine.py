"""Name the machine a benchmark ran on, so every number carries its context."""

from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    """CPU model, core count, OS and the BLAS MLX was given (see metal_marlin._blas)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from metal_marlin import _blas
    import mlx.core as mx

    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, mlx {mx.__version__} on {mx.default_device()}, "
        f"MLX BLAS: {_blas.loaded_blas or 'bundled reference'}"
    )
