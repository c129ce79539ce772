"""Independent float64 numpy forward pass of a Llama-family decoder (test helper).

Written from the published math, not from ``metal_marlin.models``, so that agreement between
the two is evidence rather than a tautology:

    h = E[tokens]
    per layer:  a = RMSNorm(h);  q,k,v = a Wq^T (+bq), a Wk^T (+bk), a Wv^T (+bv)
                (Qwen3: RMSNorm over each head of q and k)
                RoPE, rotate-half form: x*cos + rotate_half(x)*sin, angle_i = p * theta^(-2i/d)
                softmax(q k^T / sqrt(d) + causal) v, query head h reads kv head h // (H/Hkv)
                h += o Wo^T;  m = RMSNorm(h);  h += Wd (silu(Wg m) * (Wu m))
    logits = RMSNorm(h) W_head^T   (W_head = E when the embeddings are tied)

The configuration is the Hugging Face ``config.json`` dict and the weights a mapping of HF
names to anything ``np.asarray`` accepts; each tensor is converted to float64 when used,
so a 135M model needs only one layer's float64 copy at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _w(weights: Mapping[str, Any], name: str) -> np.ndarray:
    return np.asarray(weights[name], dtype=np.float64)


def _maybe(weights: Mapping[str, Any], name: str) -> np.ndarray | None:
    return _w(weights, name) if name in weights else None


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def inverse_frequencies(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None
) -> np.ndarray:
    """theta^(-2i/d), with HF's "linear" and "llama3" rescaling rules."""
    inv = 1.0 / theta ** (np.arange(head_dim // 2, dtype=np.float64) * 2.0 / head_dim)
    kind = None if not scaling else scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        out = np.empty_like(inv)
        for i, f in enumerate(inv):
            wavelength = 2 * np.pi / f
            if wavelength < old / hi:  # high frequency: unchanged
                out[i] = f
            elif wavelength > old / lo:  # low frequency: interpolated by factor
                out[i] = f / factor
            else:
                t = (old / wavelength - lo) / (hi - lo)
                out[i] = (1 - t) * f / factor + t * f
        inv = out
    elif kind not in (None, "default"):
        raise ValueError(kind)
    return inv


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x [heads, L, d]; rotate-half: pairs are (i, i + d/2)."""
    angles = positions[:, None] * inv_freq[None, :]  # [L, d/2]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _linear(x: np.ndarray, weights: Mapping[str, Any], prefix: str) -> np.ndarray:
    y = x @ _w(weights, prefix + ".weight").T
    bias = _maybe(weights, prefix + ".bias")
    return y if bias is None else y + bias


def reference_forward(
    config: Mapping[str, Any], weights: Mapping[str, Any], tokens: Sequence[int]
) -> np.ndarray:
    """float64 logits ``[L, vocab]`` for one sequence starting at position 0."""
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_heads)
    eps = float(config["rms_norm_eps"])
    theta = float(config["rope_theta"])
    inv_freq = inverse_frequencies(head_dim, theta, config.get("rope_scaling"))
    tokens = np.asarray(tokens)
    length = len(tokens)
    positions = np.arange(length, dtype=np.float64)
    future = np.triu(np.ones((length, length), dtype=bool), k=1)

    h = _w(weights, "model.embed_tokens.weight")[tokens]
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        a = rms_norm(h, _w(weights, p + "input_layernorm.weight"), eps)
        q = _linear(a, weights, p + "self_attn.q_proj").reshape(length, n_heads, head_dim)
        k = _linear(a, weights, p + "self_attn.k_proj").reshape(length, n_kv, head_dim)
        v = _linear(a, weights, p + "self_attn.v_proj").reshape(length, n_kv, head_dim)
        if p + "self_attn.q_norm.weight" in weights:
            q = rms_norm(q, _w(weights, p + "self_attn.q_norm.weight"), eps)
            k = rms_norm(k, _w(weights, p + "self_attn.k_norm.weight"), eps)
        q = apply_rope(q.transpose(1, 0, 2), positions, inv_freq)  # [H, L, d]
        k = apply_rope(k.transpose(1, 0, 2), positions, inv_freq)
        v = v.transpose(1, 0, 2)
        group = n_heads // n_kv
        out = np.empty((n_heads, length, head_dim))
        for head in range(n_heads):
            kv = head // group
            scores = q[head] @ k[kv].T / np.sqrt(head_dim)
            scores[future] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            out[head] = probs @ v[kv]
        attn = out.transpose(1, 0, 2).reshape(length, n_heads * head_dim)
        h = h + _linear(attn, weights, p + "self_attn.o_proj")
        m = rms_norm(h, _w(weights, p + "post_attention_layernorm.weight"), eps)
        gate = _linear(m, weights, p + "mlp.gate_proj")
        gated = silu(gate) * _linear(m, weights, p + "mlp.up_proj")
        h = h + _linear(gated, weights, p + "mlp.down_proj")
    h = rms_norm(h, _w(weights, "model.norm.weight"), eps)
    tied = bool(config.get("tie_word_embeddings", False))
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    return h @ _w(weights, head).T


def rel_err(actual: Any, expected: Any) -> float:
    """max |actual - expected| / max |expected|: the agreement criterion of the tests."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(a - e)) / np.max(np.abs(e)))
