"""Array backends: which namespace computes, and what type results are handed back as.

Compute runs on numpy (fast system BLAS on the CPU) or MLX (on the GPU: Metal on macOS, CUDA
on Linux; see :mod:`metal_marlin.device`); results can be
returned as numpy arrays, ``mx.array`` or ``torch.Tensor``. torch is optional and never a
dependency.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from metal_marlin import device

OUTPUT_BACKENDS = ("numpy", "mlx", "torch")
COMPUTE_BACKENDS = ("auto", "numpy", "mlx")


def compute_namespace(compute_backend: str) -> ModuleType:
    """``numpy`` or ``mlx.core`` for ``compute_backend``.

    "auto" is MLX when MLX computes on a GPU (:func:`metal_marlin.device.on_gpu`: Metal or
    CUDA), where its float32 matmuls beat numpy's; numpy on the CPU, whose system BLAS beats
    MLX's CPU backend. (macOS always has Metal unless ``--device cpu`` was chosen; then numpy
    with Accelerate is the right choice there too.)
    """
    if compute_backend not in COMPUTE_BACKENDS:
        raise ValueError(f"compute_backend must be one of {COMPUTE_BACKENDS}, got {compute_backend!r}")
    if compute_backend == "auto":
        compute_backend = "mlx" if device.on_gpu() else "numpy"
    if compute_backend == "numpy":
        return np
    import mlx.core as mx

    return mx


def check_output_backend(output_backend: str) -> None:
    """Raise early (before any work) for an unknown or unavailable output backend."""
    if output_backend not in OUTPUT_BACKENDS:
        raise ValueError(f"output_backend must be one of {OUTPUT_BACKENDS}, got {output_backend!r}")
    if output_backend == "torch":
        _import_torch()


def _import_torch() -> ModuleType:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "output_backend='torch' needs PyTorch, which metal-marlin does not depend on; "
            "install it with `pip install torch` or use output_backend='numpy'"
        ) from exc
    return torch


def to_numpy(array: Any) -> np.ndarray:
    """Any supported array (numpy, mx.array, torch.Tensor, nested lists) as numpy."""
    if isinstance(array, np.ndarray):
        return array
    module = type(array).__module__
    if module.startswith("mlx"):
        return np.array(array)
    if module.startswith("torch"):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def from_numpy(array: np.ndarray, output_backend: str) -> Any:
    """Convert a numpy result to the requested output backend."""
    check_output_backend(output_backend)
    if output_backend == "numpy":
        return array
    if output_backend == "mlx":
        import mlx.core as mx

        return mx.array(array)
    return _import_torch().from_numpy(np.ascontiguousarray(array))
