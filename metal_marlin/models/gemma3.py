"""Gemma 3 text decoder in MLX (Hugging Face ``model_type: gemma3_text``).

Built from :mod:`.llama`'s pieces (attention with its RoPE and KV cache, the gated MLP, the
block's forward and compiled decode step, the transformer's masks, positions and left
padding, the causal-LM head) with Gemma 3's differences:

* RMSNorm multiplies by ``1 + w`` (:class:`GemmaRMSNorm`; the stored ``w`` is Hugging Face's,
  ``weight_offset`` tells the AWQ fold about the 1).
* Four norms per block: the attention output and the MLP output are each normed before
  their residual add (``post_attention_layernorm``, ``post_feedforward_layernorm``), and the
  MLP input has its own ``pre_feedforward_layernorm``.
* Per-head RMSNorm of q and k before RoPE; attention scale ``query_pre_attn_scalar ** -0.5``.
* GeGLU MLP: ``down(gelu_tanh(gate(x)) * up(x))``.
* Embeddings multiplied by ``sqrt(hidden_size)`` in the model dtype.
* Interleaved local and global layers (``layer_types``; by default every 6th layer is global):
  a local layer attends to the last ``sliding_window`` positions only (the query's own
  included) and uses RoPE base ``rope_local_base_freq`` (10,000); global layers use
  ``rope_theta`` (1,000,000) and ``rope_scaling``.
* Tied embeddings; no logit soft-capping in Gemma 3 (configs that ask for it are refused).

Local layers keep every key in their cache and mask the old ones out, so the generation
engine and batch scheduler serve this model unchanged (left padding included); the cost is
cache memory that grows with the context in local layers too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .llama import (
    MLP,
    SUPPORTED_ROPE_SCALING,
    Attention,
    LlamaModel,
    LlamaTransformer,
    Mask,
    Positions,
    RoPE,
    TransformerBlock,
    _rope_scaling_type,
)
from .scaling import ScalingGroup

MODEL_TYPE = "gemma3_text"
ARCHITECTURE = "Gemma3ForCausalLM"
HIDDEN_ACTIVATION = "gelu_pytorch_tanh"
SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_SLIDING_WINDOW_PATTERN = 6  # every 6th layer global (HF's and llama.cpp's default)

# Keys of config.json that Gemma3Config interprets; everything else is carried in ``extra``.
_CONSUMED_KEYS = {
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_local_base_freq", "rope_scaling", "rope_parameters", "query_pre_attn_scalar",
    "sliding_window", "sliding_window_pattern", "_sliding_window_pattern", "layer_types",
    "vocab_size", "tie_word_embeddings", "max_position_embeddings", "hidden_activation",
    "hidden_act", "attention_bias", "final_logit_softcapping", "attn_logit_softcapping",
    "use_bidirectional_attention", "quantization", "quantization_config",
}


def layer_types_for_pattern(num_layers: int, pattern: int) -> tuple[str, ...]:
    """``layer_types`` of a sliding-window pattern: layer ``i`` is global iff ``(i+1) % pattern == 0``."""
    if pattern < 1:
        raise ValueError(f"sliding_window_pattern must be >= 1, got {pattern}")
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


def _pattern_of(layer_types: Sequence[str]) -> int | None:
    """The ``sliding_window_pattern`` that gives ``layer_types`` (mlx-lm reads only that), if any."""
    for pattern in range(1, len(layer_types) + 1):
        if tuple(layer_types) == layer_types_for_pattern(len(layer_types), pattern):
            return pattern
    return None


def _int_if_whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


@dataclass
class Gemma3Config:
    """Gemma 3 text hyperparameters, named as in Hugging Face ``config.json``.

    ``rope_theta`` and ``rope_scaling`` are the global layers'; local layers use
    ``rope_local_base_freq`` without scaling. The read-only properties at the end give the
    shared Llama pieces the flags they read.
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict[str, Any] | None = None
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 512
    layer_types: tuple[str, ...] = ()  # empty: every DEFAULT_SLIDING_WINDOW_PATTERN-th layer global
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    attention_bias: bool = False
    model_type: str = MODEL_TYPE
    extra: dict[str, Any] = field(default_factory=dict)  # other config.json keys, kept

    def __post_init__(self) -> None:
        if self.model_type != MODEL_TYPE:
            raise ValueError(f"Gemma3Config needs model_type {MODEL_TYPE!r}, got {self.model_type!r}")
        if not self.layer_types:
            self.layer_types = layer_types_for_pattern(self.num_hidden_layers, DEFAULT_SLIDING_WINDOW_PATTERN)
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if unknown := set(self.layer_types) - {SLIDING, FULL}:
            raise ValueError(f"layer_types may hold {SLIDING!r} and {FULL!r}, got {sorted(unknown)}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        kind = _rope_scaling_type(self.rope_scaling)
        if kind is not None and kind not in SUPPORTED_ROPE_SCALING:
            raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {SUPPORTED_ROPE_SCALING}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.num_attention_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key/value heads"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    # Flags the shared Llama pieces read (Attention, MLP).
    @property
    def attention_out_bias(self) -> bool:
        return self.attention_bias

    @property
    def mlp_bias(self) -> bool:
        return False

    @property
    def qk_norm(self) -> bool:
        return True

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` attends locally (sliding window)."""
        return self.layer_types[layer] == SLIDING

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> Gemma3Config:
        """Parse a Hugging Face ``config.json`` dict (transformers 4 or 5 spelling);
        ValueError for what we cannot run."""
        if d.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"unsupported model_type {d.get('model_type')!r} for Gemma 3; expected {MODEL_TYPE!r} "
                "(a multimodal 'gemma3' config nests the text model in text_config)"
            )
        act = d.get("hidden_activation", d.get("hidden_act", HIDDEN_ACTIVATION))
        if act != HIDDEN_ACTIVATION:
            raise ValueError(f"unsupported hidden_activation {act!r} for Gemma 3; expected {HIDDEN_ACTIVATION!r}")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if d.get(key) is not None:
                raise ValueError(f"{key}={d[key]} is not supported (Gemma 3 has no soft-capping)")
        if d.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=true is not supported (causal models only)")
        rope_theta = d.get("rope_theta", 1_000_000.0)
        local_theta = d.get("rope_local_base_freq", 10_000.0)
        rope_scaling = d.get("rope_scaling")
        params = d.get("rope_parameters")  # transformers >= 5: one entry per layer type
        if isinstance(params, Mapping) and isinstance(params.get(FULL), Mapping):
            full, local = params[FULL], params.get(SLIDING) or {}
            rope_theta = full.get("rope_theta", rope_theta)
            local_theta = local.get("rope_theta", local_theta)
            if rope_scaling is None and _rope_scaling_type(full) is not None:
                rope_scaling = {k: v for k, v in full.items() if k != "rope_theta"}
            if _rope_scaling_type(local) is not None:
                raise ValueError("RoPE scaling on the sliding-window layers is not supported")
        layers = int(d["num_hidden_layers"])
        layer_types = d.get("layer_types")
        if not layer_types:
            pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PATTERN))
            layer_types = layer_types_for_pattern(layers, int(pattern))
        heads = int(d["num_attention_heads"])
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or 256),
            vocab_size=int(d["vocab_size"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_local_base_freq=float(local_theta),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
            sliding_window=int(d.get("sliding_window") or 4096),
            layer_types=tuple(layer_types),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            attention_bias=bool(d.get("attention_bias", False)),
            extra={k: v for k, v in d.items() if k not in _CONSUMED_KEYS},
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers, mlx-lm and ``from_hf_dict`` accept.

        Both spellings of the layer layout: ``layer_types`` (transformers) and, where the
        layout is periodic, ``sliding_window_pattern`` (the only one mlx-lm reads).
        """
        out: dict[str, Any] = dict(self.extra)
        out.update(
            architectures=[ARCHITECTURE],
            model_type=self.model_type,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_local_base_freq=self.rope_local_base_freq,
            rope_scaling=self.rope_scaling,
            query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),  # transformers 5 checks for an int
            sliding_window=self.sliding_window,
            layer_types=list(self.layer_types),
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            hidden_activation=HIDDEN_ACTIVATION,
            attention_bias=self.attention_bias,
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
        pattern = _pattern_of(self.layer_types)
        if pattern is not None:
            out["sliding_window_pattern"] = pattern
        return out

    def replace(self, **changes: Any) -> Gemma3Config:
        """A copy with some fields changed (``layer_types`` follows a new ``num_hidden_layers``
        unless given)."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            pattern = _pattern_of(self.layer_types) or DEFAULT_SLIDING_WINDOW_PATTERN
            changes["layer_types"] = layer_types_for_pattern(changes["num_hidden_layers"], pattern)
        return dataclasses.replace(self, **changes)


class GemmaRMSNorm(nn.Module):
    """RMSNorm that multiplies by ``1 + weight``: ``weight`` is stored as Hugging Face does.

    ``weight_offset`` is what the stored weight lacks of the multiplier, so that code folding
    a scale into the norm (the AWQ pipeline) keeps ``(weight + offset) / s - offset``.
    """

    weight_offset = 1.0

    def __init__(self, dims: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight + self.weight_offset, self.eps)


def sliding_window_mask(mask: Mask, length: int, total: int, window: int) -> Mask:
    """``mask`` restricted to keys less than ``window`` positions before their query.

    The ``length`` queries are the last of the ``total`` keys (a full sequence, or a cache
    plus new tokens), so a query at key index ``q`` may see keys ``q - window < k <= q``.
    ``"causal"`` becomes a boolean ``[L, S]`` band; a boolean array is and-ed with it; an
    additive array gets the dtype's minimum outside it. Left padding shifts a row's queries
    and keys alike, so index distance is position distance. ``None`` (no masking on
    purpose) and sequences no longer than the window come back unchanged.
    """
    if mask is None or total <= window:
        return mask
    q_idx = mx.arange(total - length, total)[:, None]
    k_idx = mx.arange(total)[None, :]
    band = (q_idx - k_idx) < window
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be 'causal', None or an array, got {mask!r}")
        return band & (k_idx <= q_idx)
    if mask.dtype == mx.bool_:
        return mask & band
    return mx.where(band, mask, mx.array(mx.finfo(mask.dtype).min, dtype=mask.dtype))


class GemmaAttention(Attention):
    """Llama's grouped-query attention with Gemma's q/k norms, scale, and (local layers)
    sliding window and local RoPE base."""

    norm_class = GemmaRMSNorm

    def __init__(self, cfg: Gemma3Config, layer: int) -> None:
        super().__init__(cfg)  # projections, q/k norms, the global layers' RoPE
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.sliding_window: int | None = cfg.sliding_window if cfg.is_sliding(layer) else None
        if self.sliding_window is not None:
            self.rope = RoPE(cfg.head_dim, cfg.rope_local_base_freq, None)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask: Mask) -> mx.array:
        if self.sliding_window is not None:
            mask = sliding_window_mask(mask, q.shape[2], k.shape[2], self.sliding_window)
        return super().attend(q, k, v, mask)


class GemmaMLP(MLP):
    """GeGLU: ``down(gelu_tanh(gate(x)) * up(x))`` (``gelu_pytorch_tanh``)."""

    activation = staticmethod(nn.gelu_approx)


class GemmaDecoderBlock(TransformerBlock):
    """Gemma 3 block: norms around attention and MLP, each output normed before its residual."""

    SCALING_GROUPS: tuple[ScalingGroup, ...] = (
        ScalingGroup("attn_qkv", "attn_input", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
        ScalingGroup("attn_o", "o_proj_input", ("self_attn.o_proj",), "self_attn.v_proj"),
        ScalingGroup("mlp_gate_up", "mlp_input", ("mlp.gate_proj", "mlp.up_proj"), "pre_feedforward_layernorm"),
        ScalingGroup("mlp_down", "down_proj_input", ("mlp.down_proj",), "mlp.up_proj"),
    )

    def __init__(self, cfg: Gemma3Config, layer: int) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(d, eps)
        self.self_attn = GemmaAttention(cfg, layer)
        self.post_attention_layernorm = GemmaRMSNorm(d, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(d, eps)
        self.mlp = GemmaMLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(d, eps)

    def _post_attention(
        self, x: mx.array, context: mx.array, inputs: dict[str, mx.array] | None = None
    ) -> mx.array:
        """o_proj, post-attention norm and residual, then the normed MLP and its residual.

        ``inputs``, when given, receives the MLP's linear inputs (see :meth:`capture`).
        """
        h = x + self.post_attention_layernorm(self.self_attn.o_proj(context))
        mlp_in = self.pre_feedforward_layernorm(h)
        hidden = self.mlp.hidden(mlp_in)
        if inputs is not None:
            inputs.update(mlp_input=mlp_in, down_proj_input=hidden)
        return h + self.post_feedforward_layernorm(self.mlp.down_proj(hidden))

    def capture(
        self, x: mx.array, mask: Mask = "causal", positions: Positions = None
    ) -> tuple[mx.array, dict[str, mx.array]]:
        """Block output plus the input of every linear group, for AWQ calibration.

        Keys: ``attn_input`` (shared by q/k/v_proj), ``o_proj_input``, ``mlp_input``
        (shared by gate/up_proj), ``down_proj_input``. Same math as ``__call__``; a local
        layer applies its window to ``"causal"`` itself.
        """
        attn_in = self.input_layernorm(x)
        ctx = self.self_attn.context(attn_in, mask, None, positions)
        inputs = {"attn_input": attn_in, "o_proj_input": ctx}
        return self._post_attention(x, ctx, inputs), inputs


class Gemma3Transformer(LlamaTransformer):
    """Scaled embeddings, Gemma blocks (local and global), final Gemma norm."""

    norm_class = GemmaRMSNorm

    def __init__(self, cfg: Gemma3Config) -> None:
        super().__init__(cfg)
        self.embed_scale = math.sqrt(cfg.hidden_size)  # a float, not a parameter

    def make_layers(self, cfg: Gemma3Config) -> list[TransformerBlock]:
        return [GemmaDecoderBlock(cfg, i) for i in range(cfg.num_hidden_layers)]

    def embed(self, tokens: mx.array) -> mx.array:
        """Embeddings times ``sqrt(hidden_size)``, the scale rounded to the embeddings' dtype
        (as Hugging Face does): the first block's input."""
        h = self.embed_tokens(tokens)
        return h * mx.array(self.embed_scale, dtype=h.dtype)


class Gemma3Model(LlamaModel):
    """Causal LM: :class:`Gemma3Transformer` plus the tied output head (``LlamaModel``'s).

    Half precision is bfloat16: Gemma's residual stream outgrows float16 (largest |h| on a
    short prompt through the 270M model, float32: 3e3 after block 0, 1.0e5 by block 13,
    against float16's 65504), which turns float16 logits into NaN.
    """

    transformer_class = Gemma3Transformer
    half_dtype = mx.bfloat16
