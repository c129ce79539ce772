"""Independent float64 numpy forward pass of a Gemma 3 text decoder (test helper).

Written from the architecture's definition, not from ``metal_marlin.models``, so that
agreement between the two is evidence rather than a tautology:

    N(x, w) = x / sqrt(mean(x^2) + eps) * (1 + w)                  (every norm)
    h = E[tokens] * sqrt(d)
    per layer (local iff layer_types[i] == "sliding_attention"):
        a = N(h, w_input)
        q, k, v = a Wq^T, a Wk^T, a Wv^T, split into heads;  q, k = N(q, w_qn), N(k, w_kn) per head
        RoPE rotate-half, angle_j = p * base^(-2j/d_head); base = rope_local_base_freq (local)
            or rope_theta with rope_scaling (global)
        softmax(q k^T * query_pre_attn_scalar^-0.5 + mask) v, query head h reads kv head
            h // (H/Hkv); mask: causal, and for local layers q - k < sliding_window
        h += N(o Wo^T, w_post_attention)
        m = N(h, w_pre_feedforward)
        h += N(Wd (gelu_tanh(Wg m) * (Wu m)), w_post_feedforward)
    logits = N(h, w_final) E^T      (tied embeddings; no soft-capping)

The configuration is the Hugging Face ``config.json`` dict; weights map HF names to anything
``np.asarray`` accepts and are converted to float64 one tensor at a time (the 262k x 640
embedding only row by row and in vocabulary chunks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from reference_llama import apply_rope, inverse_frequencies

_HEAD_CHUNK = 32768  # vocabulary rows of the output head per float64 matmul


def _w(weights: Mapping[str, Any], name: str) -> np.ndarray:
    return np.asarray(weights[name], dtype=np.float64)


def gemma_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + weight)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _layer_types(config: Mapping[str, Any]) -> list[str]:
    n = int(config["num_hidden_layers"])
    if config.get("layer_types"):
        return list(config["layer_types"])
    pattern = int(config.get("sliding_window_pattern", 6))
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]


def reference_forward(config: Mapping[str, Any], weights: Mapping[str, Any], tokens: Sequence[int]) -> np.ndarray:
    """float64 logits ``[L, vocab]`` for one sequence starting at position 0."""
    d = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config["head_dim"])
    eps = float(config["rms_norm_eps"])
    window = int(config["sliding_window"])
    scale = float(config["query_pre_attn_scalar"]) ** -0.5
    local_freq = inverse_frequencies(head_dim, float(config["rope_local_base_freq"]), None)
    global_freq = inverse_frequencies(head_dim, float(config["rope_theta"]), config.get("rope_scaling"))
    tokens = np.asarray(tokens)
    length = len(tokens)
    positions = np.arange(length, dtype=np.float64)
    distance = positions[:, None] - positions[None, :]  # query - key
    embed = np.asarray(weights["model.embed_tokens.weight"])

    h = embed[tokens].astype(np.float64) * np.sqrt(d)
    for i, kind in enumerate(_layer_types(config)):
        p = f"model.layers.{i}."
        local = kind == "sliding_attention"
        blocked = (distance < 0) | (local & (distance >= window))
        a = gemma_norm(h, _w(weights, p + "input_layernorm.weight"), eps)
        q = (a @ _w(weights, p + "self_attn.q_proj.weight").T).reshape(length, n_heads, head_dim)
        k = (a @ _w(weights, p + "self_attn.k_proj.weight").T).reshape(length, n_kv, head_dim)
        v = (a @ _w(weights, p + "self_attn.v_proj.weight").T).reshape(length, n_kv, head_dim)
        q = gemma_norm(q, _w(weights, p + "self_attn.q_norm.weight"), eps)
        k = gemma_norm(k, _w(weights, p + "self_attn.k_norm.weight"), eps)
        freq = local_freq if local else global_freq
        q = apply_rope(q.transpose(1, 0, 2), positions, freq)  # [H, L, d]
        k = apply_rope(k.transpose(1, 0, 2), positions, freq)
        v = v.transpose(1, 0, 2)
        group = n_heads // n_kv
        out = np.empty((n_heads, length, head_dim))
        for head in range(n_heads):
            kv = head // group
            scores = q[head] @ k[kv].T * scale
            scores[blocked] = -np.inf
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            out[head] = probs @ v[kv]
        attn = out.transpose(1, 0, 2).reshape(length, n_heads * head_dim) @ _w(weights, p + "self_attn.o_proj.weight").T
        h = h + gemma_norm(attn, _w(weights, p + "post_attention_layernorm.weight"), eps)
        m = gemma_norm(h, _w(weights, p + "pre_feedforward_layernorm.weight"), eps)
        gated = gelu_tanh(m @ _w(weights, p + "mlp.gate_proj.weight").T) * (m @ _w(weights, p + "mlp.up_proj.weight").T)
        ffn = gated @ _w(weights, p + "mlp.down_proj.weight").T
        h = h + gemma_norm(ffn, _w(weights, p + "post_feedforward_layernorm.weight"), eps)
    h = gemma_norm(h, _w(weights, "model.norm.weight"), eps)
    return np.concatenate(
        [h @ embed[start : start + _HEAD_CHUNK].astype(np.float64).T for start in range(0, embed.shape[0], _HEAD_CHUNK)],
        axis=-1,
    )
