"""Llama-family decoder in MLX: Llama, Mistral, Qwen2, Qwen3, SmolLM2.

One implementation serves inference (with a KV cache) and calibration (block by block,
float32, no cache), so the quantizer measures exactly the network that will be served.

Parameter names are Hugging Face's (and mlx-lm's), e.g. ``model.layers.0.self_attn.q_proj
.weight``, so ``dict(tree_flatten(model.parameters()))`` is a loadable HF state dict and
checkpoints need no renaming.

Family differences handled by ``LlamaConfig`` flags:

* Qwen2: biases on q/k/v projections (``attention_bias``), none on o_proj.
* Qwen3: RMSNorm over each head of q and k before RoPE (``qk_norm``).
* Mistral: ``sliding_window`` is not applied; results equal sliding-window attention only
  while the context is no longer than the window (4096 for Mistral 7B v0.1, none for
  later versions).

RoPE is the HF "rotate half" convention (``mx.fast.rope(traditional=False)``); scaling
types ``linear`` and ``llama3`` are supported, anything else is rejected at config time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from metal_marlin import device

from .cache import DEFAULT_STEP, KVCache, make_cache
from .layers import DENSE_COPY_MIN_ROWS, DENSE_WEIGHT_ATTR, project_stacked
from .scaling import ScalingGroup

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_SCALING = ("linear", "llama3")

# Keys of config.json that LlamaConfig interprets; everything else is carried in ``extra``.
_CONSUMED_KEYS = {
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "vocab_size", "tie_word_embeddings", "max_position_embeddings", "rope_scaling",
    "rope_parameters", "attention_bias", "mlp_bias", "hidden_act", "partial_rotary_factor",
    # Quantization is described by the checkpoint loader's metadata, never carried along:
    # re-saving a dequantized model must not claim to be quantized.
    "quantization", "quantization_config",
}

Mask = Union[None, str, mx.array]
Positions = Union[int, mx.array, None]


def _rope_scaling_type(scaling: Mapping[str, Any] | None) -> str | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    return None if kind in (None, "default") else str(kind)


@dataclass
class LlamaConfig:
    """Architecture hyperparameters, named as in Hugging Face ``config.json``."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 2048
    rope_scaling: dict[str, Any] | None = None
    model_type: str = "llama"
    attention_bias: bool = False  # biases on q/k/v
    attention_out_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 per-head RMSNorm on q and k
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, kept

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        kind = _rope_scaling_type(self.rope_scaling)
        if kind is not None and kind not in SUPPORTED_ROPE_SCALING:
            raise ValueError(
                f"unsupported rope_scaling type {kind!r}; supported: {SUPPORTED_ROPE_SCALING}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Parse a Hugging Face ``config.json`` dict; ValueError for what we cannot run."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r} "
                f"(architectures {d.get('architectures')}); supported: {SUPPORTED_MODEL_TYPES}"
            )
        act = d.get("hidden_act", d.get("hidden_activation", "silu"))
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for {model_type}; expected 'silu'")
        if float(d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        if model_type == "qwen2" and d.get("use_sliding_window"):
            raise ValueError("qwen2 with use_sliding_window=true is not supported")
        rope_theta = d.get("rope_theta")
        rope_scaling = d.get("rope_scaling")
        params = d.get("rope_parameters")  # transformers >= 5 nests RoPE settings here
        if isinstance(params, Mapping):
            rope_theta = params.get("rope_theta", rope_theta)
            if rope_scaling is None and _rope_scaling_type(params) is not None:
                rope_scaling = dict(params)
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        bias = bool(d.get("attention_bias", False))
        return cls(
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            vocab_size=int(d["vocab_size"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            model_type=model_type,
            attention_bias=True if model_type == "qwen2" else bias,
            attention_out_bias=False if model_type == "qwen2" else bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            extra={k: v for k, v in d.items() if k not in _CONSUMED_KEYS},
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers, mlx-lm and ``from_hf_dict`` accept."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            rope_scaling=self.rope_scaling,
            hidden_act="silu",
        )
        if self.model_type != "qwen2":  # qwen2's q/k/v biases are implied by its type
            if self.attention_bias != self.attention_out_bias:
                raise ValueError(f"{self.model_type} cannot express q/k/v bias without o bias")
            out["attention_bias"] = self.attention_bias
        if self.mlp_bias:
            out["mlp_bias"] = True
        return out

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def rope_frequencies(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None
) -> mx.array | None:
    """Per-pair wavelengths (MLX's ``freqs``: angle = position / freq) for llama3 scaling.

    Returns None when plain ``base``/``scale`` suffice (no scaling, or linear scaling).
    Follows the published Llama 3.1 rule: long wavelengths are divided by ``factor``,
    short ones kept, the band between interpolated smoothly.
    """
    if _rope_scaling_type(scaling) != "llama3":
        return None
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(
        wavelen > old_len / low,
        inv_freq / factor,
        np.where(wavelen < old_len / high, inv_freq, blended),
    )
    return mx.array((1.0 / scaled).astype(np.float32))


class RoPE(nn.Module):
    """Rotary position embedding, HF rotate-half layout, per-row offsets allowed."""

    def __init__(self, head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scale = 1.0
        if _rope_scaling_type(scaling) == "linear":
            self.scale = 1.0 / float(scaling["factor"])
        self._freqs = rope_frequencies(head_dim, theta, scaling)

    def __call__(self, x: mx.array, offset: int | mx.array) -> mx.array:
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=None if self._freqs is not None else self.theta,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )


class Attention(nn.Module):
    """Grouped-query self-attention."""

    #: Norm over each head of q and k when ``cfg.qk_norm`` (an architecture whose norm differs
    #: subclasses and sets its own).
    norm_class: type[nn.Module] = nn.RMSNorm

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=cfg.attention_out_bias)
        if cfg.qk_norm:
            self.q_norm = self.norm_class(hd, eps=cfg.rms_norm_eps)
            self.k_norm = self.norm_class(hd, eps=cfg.rms_norm_eps)
        self.rope = RoPE(hd, cfg.rope_theta, cfg.rope_scaling)

    def context(
        self, x: mx.array, mask: Mask = "causal", cache: KVCache | None = None,
        positions: Positions = None,
    ) -> mx.array:
        """Attention output before ``o_proj`` (``[B, L, n_heads*head_dim]``): o_proj's input."""
        if positions is None:
            positions = cache.offset if cache is not None else 0
        q, k, v = self.queries_keys_values(x, positions)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return self.attend(q, k, v, mask)

    def queries_keys_values(self, x: mx.array, positions: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """``q, k, v`` as ``[B, heads, L, head_dim]``, RoPE applied: what attention and the cache take."""
        b, length, _ = x.shape
        q, k, v = project_stacked(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(b, length, self.n_heads, self.head_dim)
        k = k.reshape(b, length, self.n_kv_heads, self.head_dim)
        v = v.reshape(b, length, self.n_kv_heads, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        return self.rope(q, positions), self.rope(k, positions), v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Mask) -> mx.array:
        """Scaled dot-product attention, heads merged back: ``[B, L, n_heads*head_dim]``."""
        b, _, length, _ = q.shape
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, length, self.n_heads * self.head_dim)

    def __call__(
        self, x: mx.array, mask: Mask = "causal", cache: KVCache | None = None,
        positions: Positions = None,
    ) -> mx.array:
        return self.o_proj(self.context(x, mask, cache, positions))


class MLP(nn.Module):
    """Gated feed-forward: ``down(act(gate(x)) * up(x))``, ``act`` = :attr:`activation` (SiLU)."""

    activation = staticmethod(nn.silu)

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)

    def hidden(self, x: mx.array) -> mx.array:
        """The gated activation: ``down_proj``'s input."""
        gate, up = project_stacked(x, (self.gate_proj, self.up_proj))
        return self.activation(gate) * up

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.hidden(x))


def compiled_decode_enabled() -> bool:
    """Whether decode steps run the compiled block (:meth:`DecoderBlock._decode_compiled`):
    :func:`metal_marlin.device.use_compile`. On the CPU the uncompiled path also keeps its
    bit-for-bit batching guarantees."""
    return device.use_compile()


class TransformerBlock(nn.Module):
    """What every decoder block shares: the forward and its compiled decode step.

    A subclass builds ``input_layernorm`` and ``self_attn`` (an :class:`Attention`), defines
    :meth:`_post_attention` (everything after attention), ``capture`` and its
    ``SCALING_GROUPS``; the forward is then ``_post_attention(x, attention context of
    input_layernorm(x))``, eager or (decode steps on a GPU) compiled.

    ``mask`` defaults to ``"causal"``, which is right both for a full sequence and for
    decoding with a cache (MLX aligns it to the last key). Pass ``None`` only to disable
    masking on purpose, or a boolean/additive array ``[B|1, 1, L, S]``.
    ``positions`` is the RoPE position of the first token of ``x``: an int, or an int32
    array ``[B]`` for per-row positions (left-padded batches); by default the cache offset.
    """

    SCALING_GROUPS: tuple[ScalingGroup, ...] = ()
    """AWQ's groups for this block (see :mod:`metal_marlin.models.scaling`)."""

    def __init__(self) -> None:
        super().__init__()
        self._compiled: tuple[Any, Any] | None = None  # see _decode_compiled (not a parameter)

    def __call__(
        self, x: mx.array, mask: Mask = "causal", cache: KVCache | None = None,
        positions: Positions = None,
    ) -> mx.array:
        if cache is not None and x.shape[1] == 1 and compiled_decode_enabled():
            return self._decode_compiled(x, mask, cache, positions)
        return self._post_attention(x, self.self_attn.context(self.input_layernorm(x), mask, cache, positions))

    def _post_attention(self, x: mx.array, context: mx.array) -> mx.array:
        """The block's output from its input ``x`` and the attention context (o_proj's input)."""
        raise NotImplementedError

    # ------------------------------------------------------------ compiled decode (GPU)
    def _pre_attention(self, x: mx.array, positions: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Norm, q/k/v and RoPE of one decode token: attention's inputs."""
        return self.self_attn.queries_keys_values(self.input_layernorm(x), positions)

    def _decode_compiled(self, x: mx.array, mask: Mask, cache: KVCache, positions: Positions) -> mx.array:
        """One decode token through the block with its graph traced once per shape.

        Why: on a GPU a decode step's graph (about 35 operations a block) costs more to
        build in Python than the device takes to run it. ``mx.compile`` replays the traced
        graph without Python and fuses its elementwise work. The KV-cache update and the
        attention stay outside (their sizes change every step); the two compiled halves
        around them take the RoPE position as an array, so one trace serves every step.
        Same operations as ``__call__``; the weights are the traced graph's constants.
        """
        if positions is None:
            positions = cache.offset
        if not isinstance(positions, mx.array):
            positions = mx.array(positions, dtype=mx.int32)
        if self._compiled is None:
            self._compiled = (mx.compile(self._pre_attention), mx.compile(self._post_attention))
        pre, post = self._compiled
        q, k, v = pre(x, positions)
        k, v = cache.update_and_fetch(k, v)
        return post(x, self.self_attn.attend(q, k, v, mask))


class DecoderBlock(TransformerBlock):
    """Llama's pre-norm transformer block; the unit calibration runs one at a time."""

    SCALING_GROUPS: tuple[ScalingGroup, ...] = (
        ScalingGroup("attn_qkv", "attn_input", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        ScalingGroup("attn_o", "o_proj_input", ("self_attn.o_proj",), "self_attn.v_proj"),
        ScalingGroup("mlp_gate_up", "mlp_input", ("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
        ScalingGroup("mlp_down", "down_proj_input", ("mlp.down_proj",), "mlp.up_proj"),
    )

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def _post_attention(self, x: mx.array, context: mx.array) -> mx.array:
        """o_proj, both residuals and the MLP, after attention."""
        h = x + self.self_attn.o_proj(context)
        return h + self.mlp(self.post_attention_layernorm(h))

    def capture(
        self, x: mx.array, mask: Mask = "causal", positions: Positions = None
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """Block output plus the input of every linear group, for AWQ calibration.

        Keys: ``attn_input`` (shared by q/k/v_proj), ``o_proj_input``, ``mlp_input``
        (shared by gate/up_proj), ``down_proj_input``. Same math as ``__call__``.
        """
        attn_in = self.input_layernorm(x)
        ctx = self.self_attn.context(attn_in, mask, None, positions)
        h = x + self.self_attn.o_proj(ctx)
        mlp_in = self.post_attention_layernorm(h)
        hidden = self.mlp.hidden(mlp_in)
        out = h + self.mlp.down_proj(hidden)
        inputs = {
            "attn_input": attn_in,
            "o_proj_input": ctx,
            "mlp_input": mlp_in,
            "down_proj_input": hidden,
        }
        return out, inputs


def padded_causal_mask(length: int, offset: int, left_padding: mx.array) -> mx.array:
    """Boolean mask ``[B, 1, L, offset+L]`` for left-padded rows (True = may attend).

    Keys before ``left_padding[b]`` are padding and hidden. A padding *query* would then see
    no key at all, and an all-masked softmax is NaN, which would leak into the cache of the
    next layer; so every query also sees itself.
    """
    q_idx = mx.arange(offset, offset + length)[:, None]
    k_idx = mx.arange(offset + length)[None, :]
    causal = k_idx <= q_idx
    real = k_idx[None] >= left_padding[:, None, None]
    mask = causal[None] & (real | (k_idx == q_idx)[None])
    return mask[:, None]


class LlamaTransformer(nn.Module):
    """Embeddings, decoder blocks, final norm (HF's inner ``model``).

    Another architecture subclasses it with its own :meth:`make_layers`, ``norm_class`` and
    :meth:`embed`, and keeps the forward (masks, positions, left padding, caches).
    """

    norm_class: type[nn.Module] = nn.RMSNorm

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = self.make_layers(cfg)
        self.norm = self.norm_class(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def make_layers(self, cfg: LlamaConfig) -> list[TransformerBlock]:
        """The decoder blocks, first to last."""
        return [DecoderBlock(cfg) for _ in range(cfg.num_hidden_layers)]

    def embed(self, tokens: mx.array) -> mx.array:
        """The first block's input for ``tokens``: what calibration and ``collect`` capture
        (an architecture that scales its embeddings does it here)."""
        return self.embed_tokens(tokens)

    def __call__(
        self,
        tokens: mx.array,
        cache: Sequence[KVCache] | None = None,
        left_padding: Sequence[int] | mx.array | None = None,
    ) -> mx.array:
        h = self.embed(tokens)
        offset = cache[0].offset if cache else 0
        if left_padding is None:
            mask: Mask = "causal"
            positions: Positions = offset
        else:
            pad = mx.array(left_padding, dtype=mx.int32).reshape(-1)
            if pad.shape[0] != tokens.shape[0]:
                raise ValueError(f"left_padding has {pad.shape[0]} rows, tokens {tokens.shape[0]}")
            mask = padded_causal_mask(tokens.shape[1], offset, pad)
            positions = offset - pad
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"{len(cache)} caches for {len(self.layers)} layers")
        if cache is not None and tokens.shape[1] == 1 and not isinstance(positions, mx.array) and compiled_decode_enabled():
            positions = mx.array(positions, dtype=mx.int32)  # once per step, not per block
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache is not None else None, positions)
        return self.norm(h)


class LlamaModel(nn.Module):
    """Causal LM: ``LlamaTransformer`` plus the (possibly tied) output head."""

    transformer_class: type[LlamaTransformer] = LlamaTransformer
    #: The 16-bit float this architecture computes in when half precision is asked for.
    half_dtype: mx.Dtype = mx.float16

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = self.transformer_class(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def lm_logits(self, h: mx.array) -> mx.array:
        """Final-normed hidden states ``[..., D]`` -> float32 logits ``[..., V]``."""
        embed = self.model.embed_tokens
        if "lm_head" in self:
            out = self.lm_head(h)
        elif DENSE_WEIGHT_ATTR in embed and h.size // h.shape[-1] >= DENSE_COPY_MIN_ROWS and not device.on_gpu():
            out = h.astype(mx.float32) @ embed[DENSE_WEIGHT_ATTR].T  # see cache_dense_cpu_weights
        else:
            out = embed.as_linear(h)
        return out.astype(mx.float32)

    def __call__(
        self,
        tokens: mx.array,
        cache: Sequence[KVCache] | None = None,
        *,
        left_padding: Sequence[int] | mx.array | None = None,
    ) -> mx.array:
        """Logits ``[B, L, V]`` (float32) for int tokens ``[B, L]``.

        With ``cache`` (one ``KVCache`` per layer, see ``make_cache``) the tokens continue
        the cached sequence. ``left_padding`` (``[B]`` ints) marks how many leading
        positions of each row are padding: they are masked out of attention and the row's
        positions start at its first real token. Pass the same ``left_padding`` on every
        later decoding step of that batch.
        """
        return self.lm_logits(self.model(tokens, cache, left_padding))

    def make_cache(self, step: int = DEFAULT_STEP) -> list[KVCache]:
        """Empty caches, one per decoder layer."""
        return make_cache(len(self.model.layers), step)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def sanitize(self, weights: Mapping[str, Any]) -> dict[str, Any]:
        """Drop tensors HF checkpoints carry that this model does not use."""
        out = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.config.tie_word_embeddings:
            for key in [k for k in out if k.startswith("lm_head.")]:
                del out[key]
        return out
