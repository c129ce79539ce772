"""Fused GPU kernels of our own, behind :class:`metal_marlin.models.layers.QuantizedLinear`.

MLX's own ``quantized_matmul`` is the general path. For the few-row products of decoding
(one to a few sequences, every weight read once per token) its CUDA kernel reads weights
far below the memory bandwidth; :mod:`.gemv` replaces it there.
"""

from metal_marlin.kernels.gemv import (
    FUSED_MAX_ROWS,
    fused_int4_available,
    int4_gemv,
    int4_gemv_supported,
    set_fused_kernels,
)

__all__ = ["FUSED_MAX_ROWS", "fused_int4_available", "int4_gemv", "int4_gemv_supported", "set_fused_kernels"]
