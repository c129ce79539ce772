"""MLX decoder models (Llama family, Gemma 3) shared by inference and calibration."""

from .cache import KVCache, make_cache
from .gemma3 import Gemma3Config, Gemma3Model, GemmaDecoderBlock, GemmaRMSNorm
from .layers import QuantizedLinear, quantize_model_layers
from .llama import (
    Attention,
    DecoderBlock,
    LlamaConfig,
    LlamaModel,
    LlamaTransformer,
    MLP,
    TransformerBlock,
    padded_causal_mask,
)
from .registry import SUPPORTED_MODEL_TYPES, ModelConfig, config_from_hf_dict, model_for_config

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Attention",
    "DecoderBlock",
    "Gemma3Config",
    "Gemma3Model",
    "GemmaDecoderBlock",
    "GemmaRMSNorm",
    "KVCache",
    "LlamaConfig",
    "LlamaModel",
    "LlamaTransformer",
    "MLP",
    "ModelConfig",
    "QuantizedLinear",
    "TransformerBlock",
    "config_from_hf_dict",
    "make_cache",
    "model_for_config",
    "padded_causal_mask",
    "quantize_model_layers",
]
