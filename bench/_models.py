"""Random-weight quantized models of a given shape, for speed benchmarks.

Decode speed does not depend on the weights' values, only on their shapes and layout, so
an 8B-shaped model can be measured without 8B of real weights. The model is our
:class:`~metal_marlin.models.llama.LlamaModel` with every linear, the embedding and the head
quantized (MLX affine layout), built one layer at a time so that peak memory stays at the
packed size: float weights are never materialised.

Values are chosen so activations stay finite through any depth in float16: codes are
uniform random nibbles, ``scale ~ 1/(4.6*sqrt(K))`` (so a projection of a unit-RMS input
has unit RMS) and ``bias = -7.5*scale`` (zero-mean weights); norms are ones.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from metal_marlin.kernels.gemv import random_words
from metal_marlin.models.layers import quantize_model_layers
from metal_marlin.models.llama import LlamaConfig, LlamaModel

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192,
)


def llama_config(**overrides: Any) -> LlamaConfig:
    """The Llama-3-8B shape, with any field overridden (tiny shapes for smoke runs)."""
    return LlamaConfig(**{**LLAMA3_8B, **overrides})


def _quantizable(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``path -> (out, in)`` of every Linear and Embedding (embedding: ``(vocab, dims)``)."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            found[path] = tuple(module.weight.shape)
    return found


def random_quantized_llama(
    cfg: LlamaConfig, dtype: mx.Dtype = mx.float16, group_size: int = 64, bits: int = 4, seed: int = 0
) -> LlamaModel:
    """A ``LlamaModel`` of shape ``cfg`` with random quantized weights (see module doc)."""
    model = LlamaModel(cfg)
    shapes = _quantizable(model)
    # quantize_model_layers reads only the shapes of these (lazy, never evaluated) arrays.
    stubs: dict[str, mx.array] = {}
    for path, (out_dims, in_dims) in shapes.items():
        stubs[f"{path}.weight"] = mx.zeros((out_dims, in_dims * bits // 32), dtype=mx.uint32)
        stubs[f"{path}.scales"] = mx.zeros((out_dims, in_dims // group_size), dtype=dtype)
    quantize_model_layers(model, {"group_size": group_size, "bits": bits}, stubs)
    key = mx.random.key(seed)
    modules = dict(model.named_modules())
    for path, (out_dims, in_dims) in shapes.items():
        key, kw, ks = mx.random.split(key, 3)
        layer = modules[path]
        level = 1.0 / (4.6 * math.sqrt(in_dims))
        scales = (mx.random.uniform(0.5 * level, 1.5 * level, (out_dims, in_dims // group_size), key=ks)).astype(dtype)
        layer.weight = random_words((out_dims, in_dims * bits // 32), key=kw)
        layer.scales = scales
        # Codes are uniform on 0..2^bits-1, so -(2^bits-1)/2 * scale centres the weights: a
        # bias of -2^(bits-1)*scale leaves a common-mode component that grows through the
        # depth (seen on the H200: NaN logits after 32 layers in float16).
        layer.biases = (-((2**bits - 1) / 2) * scales.astype(mx.float32)).astype(dtype)
        mx.eval(layer.weight, layer.scales, layer.biases)
    for path, module in model.named_modules():
        if isinstance(module, nn.RMSNorm):
            module.weight = mx.ones(module.weight.shape, dtype=dtype)
    mx.eval(model.parameters())
    return model


def quantized_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes a decode step reads: every quantized matrix whole, the embedding one row."""
    matrices = embedding = 0
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedEmbedding):
            embedding += sum(getattr(module, n).nbytes for n in ("weight", "scales", "biases"))
        elif hasattr(module, "scales") and hasattr(module, "weight") and module.weight.dtype == mx.uint32:
            matrices += sum(getattr(module, n).nbytes for n in ("weight", "scales", "biases"))
    return {"per_token_bytes": matrices, "embedding_bytes": embedding}
