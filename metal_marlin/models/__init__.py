"""MLX decoder models (Llama family) shared by inference and calibration."""

from .cache import KVCache, make_cache
from .layers import QuantizedLinear, quantize_model_layers
from .llama import (
    SUPPORTED_MODEL_TYPES,
    Attention,
    DecoderBlock,
    LlamaConfig,
    LlamaModel,
    LlamaTransformer,
    MLP,
    padded_causal_mask,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Attention",
    "DecoderBlock",
    "KVCache",
    "LlamaConfig",
    "LlamaModel",
    "LlamaTransformer",
    "MLP",
    "QuantizedLinear",
    "make_cache",
    "padded_causal_mask",
    "quantize_model_layers",
]
