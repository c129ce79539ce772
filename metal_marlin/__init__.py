"""metal-marlin: activation-aware weight quantization (AWQ) for MLX.

The seed API (``awq_quantize``, ``awq_dequantize``, ``AWQResult``,
``compute_activation_stats``, ``find_salient_weights``, ``awq_quantize_model``) is
re-exported here.
"""

from metal_marlin import _blas  # noqa: F401  (must run before MLX is first used on Linux)
from metal_marlin.awq import (
    AWQResult,
    awq_dequantize,
    awq_quantize,
    compute_activation_stats,
    find_salient_weights,
)

__all__ = [
    "AWQResult",
    "awq_dequantize",
    "awq_quantize",
    "compute_activation_stats",
    "find_salient_weights",
]
__version__ = "0.1.0"
