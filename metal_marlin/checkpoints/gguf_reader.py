"""Read a GGUF file (``llama`` or ``gemma3`` architecture) into float32 Hugging Face-named weights.

The ``gguf`` package parses the file and dequantizes every tensor (Q4_1, Q8_0, Q5_0, K-quants,
...) with numpy; the dequantized values are the model's reference weights.

What llama.cpp's converter (``convert_hf_to_gguf.py``) changed on the way in is undone here:

* ``llama``: the rows of ``q_proj`` and ``k_proj`` are permuted (per head, the two rotary
  halves are interleaved) because ggml's llama RoPE rotates adjacent pairs while HF rotates
  halves. Our model uses HF's rotate-half RoPE, so a row ``(h, i, j)`` of the GGUF tensor,
  viewed as ``[n_head, head_dim/2, 2]``, is row ``(h, j, i)`` of the HF tensor viewed as
  ``[n_head, 2, head_dim/2]``. K uses the number of key/value heads.
* ``gemma3``: no permutation (Gemma's RoPE is rotate-half, NEOX style, in ggml too), but
  every ``*norm.weight`` was stored plus one (the converter's ``Gemma3Model.norm_shift``:
  Gemma multiplies by ``1 + w``), so one is subtracted to give HF's ``w``. Hyperparameters llama.cpp does not
  write but hard-codes for the architecture are filled in the same way: every 6th layer is
  global, local layers use RoPE base 10,000, and the attention scale is ``head_dim ** -0.5``
  (``hidden / heads`` in place of ``head_dim`` for the 62-layer 27B model).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..generate.chat import default_chat_template
from ..models.gemma3 import FULL, Gemma3Config, layer_types_for_pattern
from ..models.llama import LlamaConfig
from ..models.registry import ModelConfig
from ..tokenizer import end_token_ids, read_gguf_kv

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
GEMMA3_SLIDING_WINDOW_PATTERN = 6  # llama.cpp: hparams.set_swa_pattern(6) for LLM_ARCH_GEMMA3
GEMMA3_LOCAL_ROPE_BASE = 10_000.0  # llama.cpp: rope_freq_base_train_swa for LLM_ARCH_GEMMA3
GEMMA3_27B_LAYERS = 62  # the one size whose attention scale uses hidden / heads

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_SHARED_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
# ``ffn_norm`` is the norm before the MLP: Llama's post_attention_layernorm, while Gemma 3
# norms the attention output with post_attention_layernorm and has a pre_feedforward_layernorm.
_BLOCK_NAMES = {
    "llama": {**_SHARED_BLOCK_NAMES, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_SHARED_BLOCK_NAMES,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


class _Reader(gguf.GGUFReader):
    """``GGUFReader`` for the tensors, with the key/value metadata read as plain values.

    ``GGUFReader`` wraps every metadata string in numpy views (a 262k-token vocabulary took
    4.5 s here); :func:`metal_marlin.tokenizer.read_gguf_kv` walks the same section in a
    fraction of that and gives the values this module and the tokenizer use, as
    ``metadata``. Of the reader's own ``fields`` only ``general.alignment``, which its
    constructor reads to place the tensor data, is kept. ``data`` is a plain ndarray view of
    the memmap: slicing an ``np.memmap`` runs Python-level ``__array_finalize__`` each time.
    """

    metadata: dict[str, Any]

    @property
    def data(self) -> np.ndarray:
        return self._mm_plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._mm_plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    def _build_fields(self, offs: int, count: int) -> int:
        """Parse the ``count`` key/value pairs at ``offs`` into ``metadata``; their end offset."""
        swapped = self.byte_order == "S"
        native = "<" if sys.byteorder == "little" else ">"
        order = native if not swapped else (">" if native == "<" else "<")
        self.metadata, end = read_gguf_kv(self.data, offs, count, order)
        alignment = self.metadata.get("general.alignment")
        if alignment is not None:
            value = np.array([alignment], dtype=np.uint32)
            self.fields["general.alignment"] = gguf.ReaderField(offs, "general.alignment", [value], [0], [gguf.GGUFValueType.UINT32])
        return end


def hf_name(gguf_name: str, arch: str = "llama") -> str:
    """HF parameter name of a GGUF tensor of architecture ``arch``; ValueError for names we
    do not model."""
    block_names = _BLOCK_NAMES[arch]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in block_names:
        return f"model.layers.{m.group(1)}.{block_names[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL_RE.match(gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    if gguf_name.startswith("rope_freqs"):
        raise ValueError(
            "GGUF tensor 'rope_freqs' (Llama 3 RoPE frequency factors) is not supported"
        )
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for the {arch} architecture")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (``[n_head*head_dim, ...]`` rows)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_DEQUANTIZE_BYTES = 1 << 22  # stored bytes per gguf.quants.dequantize call


def dequantize_tensor(tensor: Any) -> np.ndarray:
    """Float32 values of a GGUF tensor in numpy (row-major, HF ``[out, in]`` order).

    Block-quantized tensors are dequantized a few MB of rows at a time into the result:
    ``gguf.quants.dequantize`` holds every row group's output before joining them, which
    would double a large embedding's float32 size at its peak.
    """
    qtype, data = tensor.tensor_type, tensor.data
    if qtype == gguf.GGMLQuantizationType.F64:
        return np.asarray(data, dtype=np.float32)
    plain = qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    step = len(data) if plain or data.ndim < 2 else max(1, len(data) * _DEQUANTIZE_BYTES // data.nbytes)
    try:
        first = np.asarray(gguf.quants.dequantize(data[:step], qtype), dtype=np.float32)
        if step >= len(data):
            return first
        out = np.empty((len(data), *first.shape[1:]), dtype=np.float32)
        out[:step] = first
        for start in range(step, len(data), step):
            out[start : start + step] = gguf.quants.dequantize(data[start : start + step], qtype)
    except NotImplementedError:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has unsupported tensor type {qtype.name}"
        ) from None
    return out


def _field(reader: _Reader, key: str, default: Any = None) -> Any:
    value = reader.metadata.get(key)
    return default if value is None else value


def _float32_value(v: float) -> float:
    """The short decimal a float32 metadata value was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


class _Meta:
    """``{arch}.*`` metadata of a GGUF file, each value required unless a default is given."""

    def __init__(self, reader: _Reader, arch: str) -> None:
        self.reader, self.arch = reader, arch

    def __call__(self, key: str, default: Any = None) -> Any:
        value = _field(self.reader, f"{self.arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata {self.arch}.{key} is missing")
        return value

    def optional(self, key: str) -> Any:
        return _field(self.reader, f"{self.arch}.{key}")


def _attention_dims(meta: _Meta) -> tuple[int, int, int, int]:
    """``(hidden, heads, kv_heads, head_dim)``; ValueError for partial rotary embeddings."""
    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    rot = int(meta("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"partial rotary embeddings ({rot} of {head_dim} dims) are not supported")
    return hidden, heads, int(meta("attention.head_count_kv", heads)), head_dim


def _rope_scaling(meta: _Meta) -> dict[str, Any] | None:
    kind = meta("rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_value(meta("rope.scaling.factor"))}
    if kind != "none":
        raise ValueError(f"unsupported GGUF rope scaling type {kind!r}")
    return None


def _llama_config(meta: _Meta, names: set[str], n_vocab: int) -> LlamaConfig:
    hidden, heads, kv_heads, head_dim = _attention_dims(meta)
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float32_value(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_value(meta("rope.freq_base", 10000.0)),
        vocab_size=n_vocab,
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(meta("context_length", 2048)),
        rope_scaling=_rope_scaling(meta),
        model_type="llama",
    )


def _gemma3_config(meta: _Meta, names: set[str], n_vocab: int) -> Gemma3Config:
    hidden, heads, kv_heads, head_dim = _attention_dims(meta)
    if int(meta("attention.value_length", head_dim)) != head_dim:
        raise ValueError("Gemma 3 GGUF with attention.value_length != key_length is not supported")
    softcap = meta.optional("final_logit_softcapping")
    if softcap:
        raise ValueError(f"GGUF metadata {meta.arch}.final_logit_softcapping={softcap} is not supported")
    layers = int(meta("block_count"))
    context = int(meta("context_length", 131072))
    window = meta.optional("attention.sliding_window")
    if window is None:  # the converter omits it when every layer is global
        layer_types, window = (FULL,) * layers, context
    else:
        layer_types = layer_types_for_pattern(layers, GEMMA3_SLIDING_WINDOW_PATTERN)
    return Gemma3Config(
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=n_vocab,
        rms_norm_eps=_float32_value(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_value(meta("rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=GEMMA3_LOCAL_ROPE_BASE,
        rope_scaling=_rope_scaling(meta),
        query_pre_attn_scalar=float(hidden // heads if layers == GEMMA3_27B_LAYERS else head_dim),
        sliding_window=int(window),
        layer_types=layer_types,
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=context,
    )


_CONFIG_BUILDERS = {"llama": _llama_config, "gemma3": _gemma3_config}


def _config_from_metadata(reader: _Reader, names: set[str], n_vocab: int) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF general.architecture {arch!r}; supported: {SUPPORTED_ARCHITECTURES}"
        )
    return _CONFIG_BUILDERS[arch](_Meta(reader, arch), names, n_vocab)


def _tokenizer_fields(reader: _Reader) -> dict[str, Any]:
    """All ``tokenizer.ggml.*`` fields (vocab, merges, types, special ids), for rebuilding
    the tokenizer without parsing the file a second time."""
    prefix = "tokenizer.ggml."
    return {k[len(prefix):]: v for k, v in reader.metadata.items() if k.startswith(prefix)}


class GGUFCheckpoint:
    """A GGUF file opened without dequantizing it: config and metadata at once, each tensor
    dequantized (and converted back to HF's convention, see the module docstring) when
    asked for.

    The reader memory-maps the file, so only the tensors asked for are ever expanded to
    float32; ``read_gguf`` is every tensor of this, in file order.
    ``unpermute=False`` keeps llama.cpp's Q/K row order of a llama file (only useful to
    demonstrate that the permutation matters). Raises ValueError for other architectures
    and for tensors the model does not have; a tensor type without a dequantizer raises
    when that tensor is read.
    """

    def __init__(self, path: str | Path, *, unpermute: bool = True) -> None:
        self.path = Path(path)
        self.unpermute = unpermute
        reader = _Reader(self.path)
        arch = _field(reader, "general.architecture")
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if arch in SUPPORTED_ARCHITECTURES and embd is None:
            raise ValueError(f"{self.path}: GGUF file has no token_embd.weight")
        n_vocab = int(embd.shape[-1]) if embd is not None else 0  # ggml order: [dims, vocab]
        self.config = _config_from_metadata(reader, {t.name for t in reader.tensors}, n_vocab)
        self.architecture: str = arch
        self.metadata = _metadata(reader, self.path, self.config)
        # Each tensor's data views the file mapping and keeps it open; the reader itself
        # (tens of MB of parsed vocabulary fields) is not kept.
        self._tensors = {hf_name(t.name, arch): t for t in reader.tensors}

    @property
    def names(self) -> list[str]:
        """HF names of every tensor, in file order."""
        return list(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        """Float32 values of one tensor (HF name) in HF's convention: Q/K rows in HF order
        (llama), norms without the converter's +1 (gemma3). Other stored F32 tensors come
        back as read-only views of the file."""
        w = dequantize_tensor(self._tensors[name])
        if self.architecture == "gemma3":
            return w - np.float32(1.0) if name.endswith("norm.weight") else w
        if self.unpermute and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_qk(w, self.config.num_attention_heads)
        elif self.unpermute and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_qk(w, self.config.num_key_value_heads)
        return w


def _metadata(reader: _Reader, path: Path, config: ModelConfig) -> dict[str, Any]:
    tokenizer_fields = _tokenizer_fields(reader)
    eos_ids = end_token_ids(tokenizer_fields)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    arch = _field(reader, "general.architecture")
    return {
        "source": str(path),
        "format": "gguf",
        "quantization": None,
        "gguf_file_type": _field(reader, "general.file_type"),
        "name": _field(reader, "general.name"),
        "architecture": arch,
        "chat_template": _field(reader, "tokenizer.chat_template") or default_chat_template(arch),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": eos_ids[0] if eos_ids else None,
        "eos_token_ids": eos_ids,
        "context_length": config.max_position_embeddings,
        "gguf_tokenizer": tokenizer_fields,
    }


def read_gguf(
    path: str | Path, *, unpermute: bool = True
) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
    """``(config, float32 HF-named weights, metadata)`` of a GGUF file: every tensor of
    :class:`GGUFCheckpoint` at once (same errors)."""
    checkpoint = GGUFCheckpoint(path, unpermute=unpermute)
    weights = {name: checkpoint.tensor(name) for name in checkpoint.names}
    return checkpoint.config, weights, checkpoint.metadata
