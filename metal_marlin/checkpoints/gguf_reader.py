"""Read a llama-architecture GGUF file into float32 Hugging Face-named weights.

The ``gguf`` package parses the file and dequantizes every tensor (Q4_1, Q8_0, K-quants,
...) with numpy; the dequantized values are the model's reference weights.

llama.cpp's converter permutes the rows of ``q_proj`` and ``k_proj`` (per head, the two
rotary halves are interleaved) because ggml's llama RoPE rotates adjacent pairs while HF
rotates halves. Our model uses HF's rotate-half RoPE, so the permutation is undone here:
a row ``(h, i, j)`` of the GGUF tensor, viewed as ``[n_head, head_dim/2, 2]``, is row
``(h, j, i)`` of the HF tensor viewed as ``[n_head, 2, head_dim/2]``. K uses the number of
key/value heads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..models.llama import LlamaConfig

SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


class _Reader(gguf.GGUFReader):
    """``GGUFReader`` over a plain ndarray view of its memmap.

    The reader slices its ``data`` buffer once per metadata string (~100k for a BPE vocab);
    slicing an ``np.memmap`` runs Python-level ``__array_finalize__`` each time, which
    doubles the open time. A plain view of the same mapping behaves identically.
    """

    @property
    def data(self) -> np.ndarray:
        return self._mm_plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._mm_plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def hf_name(gguf_name: str) -> str:
    """HF parameter name of a llama GGUF tensor; ValueError for names we do not model."""
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL_RE.match(gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    if gguf_name.startswith("rope_freqs"):
        raise ValueError(
            "GGUF tensor 'rope_freqs' (Llama 3 RoPE frequency factors) is not supported"
        )
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for the llama architecture")


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


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _float32_value(v: float) -> float:
    """The short decimal a float32 metadata value was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def _config_from_metadata(reader: gguf.GGUFReader, names: set[str], n_vocab: int) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF general.architecture {arch!r}; supported: {SUPPORTED_ARCHITECTURES}"
        )

    def meta(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata {arch}.{key} is missing")
        return value

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    rot = int(meta("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"partial rotary embeddings ({rot} of {head_dim} dims) are not supported")
    scaling = None
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": _float32_value(meta("rope.scaling.factor"))}
    elif kind != "none":
        raise ValueError(f"unsupported GGUF rope scaling type {kind!r}")
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_float32_value(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32_value(meta("rope.freq_base", 10000.0)),
        vocab_size=n_vocab,
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(meta("context_length", 2048)),
        rope_scaling=scaling,
        model_type="llama",
    )


def _tokenizer_fields(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All ``tokenizer.ggml.*`` fields (vocab, merges, types, special ids), for rebuilding
    the tokenizer without parsing the file a second time."""
    prefix = "tokenizer.ggml."
    return {k[len(prefix):]: f.contents() for k, f in reader.fields.items() if k.startswith(prefix)}


class GGUFCheckpoint:
    """A llama GGUF file opened without dequantizing it: config and metadata at once, each
    tensor dequantized (and Q/K un-permuted) when asked for.

    The reader memory-maps the file, so only the tensors asked for are ever expanded to
    float32; ``read_gguf`` is every tensor of this, in file order.
    ``unpermute=False`` keeps llama.cpp's Q/K row order (only useful to demonstrate that
    the permutation matters). Raises ValueError for other architectures and for tensors
    the Llama model does not have; a tensor type without a dequantizer raises when that
    tensor is read.
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
        self.metadata = _metadata(reader, self.path, self.config)
        # Each tensor's data views the file mapping and keeps it open; the reader itself
        # (tens of MB of parsed vocabulary fields) is not kept.
        self._tensors = {hf_name(t.name): t for t in reader.tensors}

    @property
    def names(self) -> list[str]:
        """HF names of every tensor, in file order."""
        return list(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        """Float32 values of one tensor (HF name), Q/K rows in HF order. Stored F32
        tensors other than Q/K come back as read-only views of the file."""
        w = dequantize_tensor(self._tensors[name])
        if self.unpermute and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_qk(w, self.config.num_attention_heads)
        elif self.unpermute and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_qk(w, self.config.num_key_value_heads)
        return w


def _metadata(reader: gguf.GGUFReader, path: Path, config: LlamaConfig) -> dict[str, Any]:
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return {
        "source": str(path),
        "format": "gguf",
        "quantization": None,
        "gguf_file_type": _field(reader, "general.file_type"),
        "name": _field(reader, "general.name"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": eos_ids[0] if eos_ids else None,
        "eos_token_ids": eos_ids,
        "context_length": config.max_position_embeddings,
        "gguf_tokenizer": _tokenizer_fields(reader),
    }


def read_gguf(
    path: str | Path, *, unpermute: bool = True
) -> tuple[LlamaConfig, dict[str, np.ndarray], dict[str, Any]]:
    """``(config, float32 HF-named weights, metadata)`` of a llama GGUF file: every tensor
    of :class:`GGUFCheckpoint` at once (same errors)."""
    checkpoint = GGUFCheckpoint(path, unpermute=unpermute)
    weights = {name: checkpoint.tensor(name) for name in checkpoint.names}
    return checkpoint.config, weights, checkpoint.metadata
