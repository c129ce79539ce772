"""Tokenizers for the models we serve, built on Hugging Face ``tokenizers``.

A Hugging Face folder carries a ready ``tokenizer.json``; a GGUF file does not. A GGUF stores the
vocabulary, merges, token types and special token ids as metadata under llama.cpp's key names,
plus a short name of the pre-tokenizer (``tokenizer.ggml.pre``) that says how text is split
into words before BPE. We rebuild an equivalent ``tokenizers.Tokenizer`` from those pieces, so
both sources end up as one :class:`Tokenizer` that can also be saved as a Hugging Face folder
(``tokenizer.json`` + ``tokenizer_config.json``) that mlx-lm and transformers load.

Two GGUF tokenizer models are rebuilt:

* byte-level BPE (``tokenizer.ggml.model == "gpt2"``: SmolLM2, Llama 3, Qwen) with the
  pre-tokenizers listed in :data:`GGUF_PRE_TOKENIZERS`;
* SentencePiece BPE (``"llama"``: Gemma, Llama 2, Mistral), which GGUF stores as pieces with
  scores and no merges. SentencePiece merges, at every step, the adjacent pair whose joined
  piece has the highest score; a BPE merge list ranked by the joined piece's score is the
  same rule, so the merges are derived from the vocabulary (:func:`spm_merges`), as Hugging
  Face's slow-to-fast converter does. Spaces become ``▁`` (plus one in front of the text when
  ``add_space_prefix``), characters outside the vocabulary fall back to ``<0xNN>`` byte
  pieces, user-defined pieces (Gemma's newline and space runs, HTML tags) are matched whole
  in the raw text, as llama.cpp does.

Anything else raises ``ValueError`` naming what is missing: a silently wrong split would still
round-trip text but give the model token sequences it never saw in training.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from metal_marlin.generate.chat import default_chat_template

__all__ = ["GGUF_PRE_TOKENIZERS", "Tokenizer", "end_token_ids", "read_gguf_kv", "read_gguf_metadata", "spm_merges"]

# llama.cpp token types (``tokenizer.ggml.token_type``).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED, _TOKEN_BYTE = (
    1,
    2,
    3,
    4,
    5,
    6,
)

# Regexes that split text into pre-tokens, keyed by llama.cpp's ``tokenizer.ggml.pre`` names.
# ``None`` means the GPT-2 regex that tokenizers' ``ByteLevel(use_regex=True)`` applies itself.
_GPT2 = None
# Llama 3: case-insensitive contractions, numbers in groups of at most three digits.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2: as Llama 3 but every digit on its own.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: ``tokenizer.ggml.pre`` value -> (split every digit first?, extra split regex or None for GPT-2's).
#: "smollm" (like "starcoder" and "refact") is llama.cpp's pair of regexes ``\p{N}`` then the
#: GPT-2 regex, i.e. the ``Digits(individual_digits=True)`` + ``ByteLevel`` pre-tokenizer of
#: SmolLM2's own ``tokenizer.json``.
GGUF_PRE_TOKENIZERS: dict[str, tuple[bool, str | None]] = {
    "default": (False, _GPT2),
    "gpt-2": (False, _GPT2),
    "gpt2": (False, _GPT2),
    "phi-2": (False, _GPT2),
    "smollm": (True, _GPT2),
    "starcoder": (True, _GPT2),
    "refact": (True, _GPT2),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "smaug-bpe": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}

#: Control tokens that end a chat turn although the file does not list them as EOS/EOT
#: (Gemma GGUFs name only ``<eos>``); llama.cpp also ends generation on them.
END_OF_TURN_TOKENS = ("<end_of_turn>",)

_SPACE_PIECE = "\u2581"  # "▁": SentencePiece's space


def end_token_ids(fields: Mapping[str, Any]) -> list[int]:
    """Ids that end generation, the document end (EOS) first: ``eos``, ``eot`` and ``eom``
    token ids, and control tokens of :data:`END_OF_TURN_TOKENS`.

    ``fields`` are the ``tokenizer.ggml.*`` fields with that prefix stripped.
    """
    tokens: Sequence[str] = fields.get("tokens") or ()
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = fields.get(key)
        if value is None or int(value) < 0 or (tokens and int(value) >= len(tokens)):
            continue  # absent, or not a token of this vocabulary (a file without one keeps it)
        if int(value) not in ids:
            ids.append(int(value))
    types: Sequence[int] = fields.get("token_type") or ()
    wanted = set(END_OF_TURN_TOKENS)
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind == _TOKEN_CONTROL and tok in wanted and i not in ids:
            ids.append(i)
    return ids


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary's scores.

    Every normal piece that splits into two pieces of the vocabulary is the result of those
    merges; a piece with a higher score merges first (ties: lower id first), and the splits
    of one piece are ordered by the ids of their halves. Only normal pieces are merge
    results: control, user-defined and byte pieces are matched or produced otherwise.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    order = sorted((i for i, t in enumerate(types) if t == _TOKEN_NORMAL and len(tokens[i]) > 1), key=lambda i: (-scores[i], i))
    merges: list[tuple[str, str]] = []
    for i in order:
        piece = tokens[i]
        splits = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None:
                splits.append((li, ri, left, right))
        splits.sort()
        merges.extend((left, right) for _, _, left, right in splits)
    return merges


# GGUF value types (gguf.GGUFValueType) -> struct format of one scalar.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Read only the key/value metadata of a GGUF file.

    ``gguf.GGUFReader`` parses every tensor and wraps each of the ~100k vocabulary strings in
    numpy views, which takes several seconds for a small model; the tokenizer needs none of
    the tensors. This walks the metadata section alone (GGUF v2/v3, either byte order) and
    returns plain Python values (strings, numbers, lists).
    """
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
        (version,) = struct.unpack_from("<I", buf, 4)
        order = "<"
        if version & 0xFFFF == 0:  # a big-endian file read as little-endian
            order = ">"
            (version,) = struct.unpack_from(">I", buf, 4)
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        _, n_kv = struct.unpack_from(order + "QQ", buf, 8)
        metadata, _ = read_gguf_kv(buf, 24, n_kv, order, where=str(path))
        return metadata


def read_gguf_kv(buf: Any, pos: int, count: int, order: str, where: str = "GGUF file") -> tuple[dict[str, Any], int]:
    """``count`` key/value pairs of a GGUF metadata section starting at byte ``pos`` of
    ``buf`` (anything with the buffer protocol: an mmap, a numpy byte array), in byte
    ``order`` (``"<"`` or ``">"``); returns the plain values and the offset after them."""
    out: dict[str, Any] = {}

    def read_string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from(order + "Q", buf, p)
        return bytes(buf[p + 8 : p + 8 + n]).decode("utf-8", errors="replace"), p + 8 + n

    def read_value(vtype: int, p: int) -> tuple[Any, int]:
        if vtype == _STRING:
            return read_string(p)
        if vtype == _ARRAY:
            etype, n = struct.unpack_from(order + "IQ", buf, p)
            p += 12
            if etype in _SCALAR_FORMATS:
                dtype = np.dtype(_SCALAR_FORMATS[etype]).newbyteorder(order)
                arr = np.frombuffer(buf, dtype=dtype, count=n, offset=p)
                return arr.tolist(), p + n * dtype.itemsize
            items = []
            for _ in range(n):
                item, p = read_value(etype, p)
                items.append(item)
            return items, p
        if vtype in _SCALAR_FORMATS:
            fmt = order + _SCALAR_FORMATS[vtype]
            return struct.unpack_from(fmt, buf, p)[0], p + struct.calcsize(fmt)
        raise ValueError(f"{where}: unknown GGUF value type {vtype}")

    for _ in range(int(count)):
        key, pos = read_string(pos)
        (vtype,) = struct.unpack_from(order + "I", buf, pos)
        out[key], pos = read_value(vtype, pos + 4)
    return out, pos


def _metadata_from_reader(reader: Any) -> dict[str, Any]:
    """Plain metadata from an already opened ``gguf.GGUFReader`` (shares the checkpoint's parse;
    the checkpoint's own reader keeps it as ``metadata``)."""
    plain = getattr(reader, "metadata", None)
    if isinstance(plain, dict):
        return dict(plain)
    return {name: field.contents() for name, field in reader.fields.items()}


def _token_content(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus what generation needs to know about its special tokens.

    ``eos_token_ids`` is a set because chat models end a turn with a token (``<|im_end|>``,
    ``<|eot_id|>``) that may differ from the document end token; generation stops on any.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        eos_token_id: int | None = None,
        unk_token_id: int | None = None,
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: set[int] = set(eos_token_ids)
        if eos_token_id is None and self.eos_token_ids:
            eos_token_id = min(self.eos_token_ids)
        if eos_token_id is not None:
            self.eos_token_ids.add(eos_token_id)
        #: The primary end token (``eos_token`` in templates and in ``tokenizer_config.json``).
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.model_max_length = model_max_length
        self._special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf(cls, source: str | Path | Any) -> Tokenizer:
        """Rebuild the tokenizer described by a GGUF file's metadata.

        ``source`` is a path (only the metadata is read, quickly) or an open
        ``gguf.GGUFReader`` (reuse the parse a checkpoint loader already did).
        """
        if isinstance(source, (str, Path)):
            metadata = read_gguf_metadata(source)
        elif hasattr(source, "fields"):
            metadata = _metadata_from_reader(source)
        else:
            raise TypeError(f"expected a GGUF path or gguf.GGUFReader, got {type(source).__name__}")
        return cls.from_gguf_metadata(metadata)

    @classmethod
    def from_gguf_metadata(cls, md: Mapping[str, Any], *, chat_template: str | None = None) -> Tokenizer:
        """Build from GGUF metadata as a plain dict (see :func:`read_gguf_metadata`).

        Keys may be spelled as in the file (``tokenizer.ggml.tokens``) or with the
        ``tokenizer.ggml.`` prefix stripped, as the checkpoint loader returns them in
        ``metadata["gguf_tokenizer"]`` (then pass ``chat_template`` separately).
        """
        if "tokenizer.ggml.model" not in md and "tokens" in md:
            md = {f"tokenizer.ggml.{k}": v for k, v in md.items()}
        if chat_template is not None:
            md = {**md, "tokenizer.chat_template": chat_template}
        model = md.get("tokenizer.ggml.model")
        if model not in _GGUF_BACKENDS:
            raise ValueError(
                f"GGUF tokenizer model {model!r} is not supported; only byte-level BPE ('gpt2') and "
                "SentencePiece BPE ('llama') can be rebuilt from GGUF metadata so far"
            )
        tokens: list[str] = list(md.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise ValueError(f"GGUF {model!r} tokenizer has no tokenizer.ggml.tokens")
        types: Sequence[int] = md.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("GGUF vocabulary has duplicate tokens")
        backend, byte_level = _GGUF_BACKENDS[model](md, vocab, tokens, types)

        # Control tokens are special (skipped when decoding with skip_special_tokens); user-defined
        # ones are matched whole in text but decode as text. Both bypass the model.
        added = [
            AddedToken(tokens[i], special=(t == _TOKEN_CONTROL), normalized=False)
            for i, t in enumerate(types)
            if t in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        ]
        backend.add_tokens(added)

        def opt_id(key: str) -> int | None:
            value = md.get(key)
            return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

        bos = opt_id("tokenizer.ggml.bos_token_id")
        eos = opt_id("tokenizer.ggml.eos_token_id")
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        prefix = "tokenizer.ggml."
        eos_ids = end_token_ids({k[len(prefix):]: v for k, v in md.items() if k.startswith(prefix)})
        # Make BOS/EOS tokens special even if the file typed them as normal.
        for i in (bos, *eos_ids):
            if i is not None and i not in backend.get_added_tokens_decoder():
                backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)])
        post = _post_processor(tokens, bos if add_bos else None, eos if add_eos else None, byte_level)
        if post is not None:
            backend.post_processor = post

        arch = md.get("general.architecture")
        ctx = md.get(f"{arch}.context_length") if arch else None
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=eos_ids,
            unk_token_id=opt_id("tokenizer.ggml.unknown_token_id"),
            pad_token_id=opt_id("tokenizer.ggml.padding_token_id"),
            chat_template=md.get("tokenizer.chat_template") or default_chat_template(arch),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            model_max_length=int(ctx) if ctx else None,
        )

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``).

        Also reads ``chat_template.jinja`` (newer transformers save the template there) and the
        ``eos_token_id`` list of ``generation_config.json`` (chat models list end-of-turn there).
        """
        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"{tj} not found (only 'fast' tokenizer.json folders are supported)")
        backend = _HFTokenizer.from_file(str(tj))
        config = _read_json(folder / "tokenizer_config.json")
        gen_config = _read_json(folder / "generation_config.json")

        def tok_id(name: str) -> int | None:
            content = _token_content(config.get(name))
            return backend.token_to_id(content) if content is not None else None

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        eos = tok_id("eos_token")
        gen_eos = gen_config.get("eos_token_id")
        eos_ids = set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        max_len = config.get("model_max_length")
        return cls(
            backend,
            bos_token_id=tok_id("bos_token"),
            eos_token_id=eos,
            eos_token_ids={int(i) for i in eos_ids},
            unk_token_id=tok_id("unk_token"),
            pad_token_id=tok_id("pad_token"),
            chat_template=template,
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            model_max_length=int(max_len) if isinstance(max_len, int) and max_len < 10**12 else None,
        )

    def save(self, folder: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``, and
        ``generation_config.json`` when more ids than the EOS end generation (Gemma's
        ``<end_of_turn>``): that is where Hugging Face folders list them, and where
        :meth:`from_folder` and the checkpoint loader read them back.

        ``tokenizer_class`` is ``PreTrainedTokenizerFast`` so that transformers uses our
        ``tokenizer.json`` as is (a model-specific class may rebuild its own pre-tokenizer).
        ``clean_up_tokenization_spaces`` is off so its ``decode`` equals ours.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        added = self.backend.get_added_tokens_decoder()
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in sorted(added.items())
            },
        }
        for name, token_id in (
            ("bos_token", self.bos_token_id),
            ("eos_token", self.eos_token_id),
            ("unk_token", self.unk_token_id),
            ("pad_token", self.pad_token_id),
        ):
            config[name] = self.id_to_token(token_id) if token_id is not None else None
        named = {self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id}
        config["additional_special_tokens"] = [
            t.content for i, t in sorted(added.items()) if t.special and i not in named
        ]
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if self.eos_token_ids - {self.eos_token_id}:
            ends = [i for i in (self.eos_token_id,) if i is not None]
            ends += sorted(self.eos_token_ids - set(ends))
            generation = {"bos_token_id": self.bos_token_id, "eos_token_id": ends}
            (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids of special (control) tokens: dropped by ``decode(..., skip_special_tokens=True)``."""
        return self._special_ids

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text -> id."""
        return {self.backend.id_to_token(i): i for i in sorted(self._special_ids)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``.

        ``add_special_tokens`` adds BOS/EOS when the model asks for them (``add_bos_token``);
        special token *text* such as ``<|im_start|>`` always maps to its single id, which chat
        templates rely on. Chat prompts that already contain the BOS text should be encoded with
        ``add_special_tokens=False`` (see :func:`metal_marlin.generate.chat.encode_chat`).
        """
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:  # tokenizer.json without a BOS template
                ids = [self.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Encode many texts (tokenizers parallelises this)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 byte runs become U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"eos_token_ids={sorted(self.eos_token_ids)}, chat_template={self.chat_template is not None})"
        )


def _bpe_backend(
    md: Mapping[str, Any], vocab: dict[str, int], tokens: Sequence[str], types: Sequence[int]
) -> tuple[_HFTokenizer, bool]:
    """Byte-level BPE (``gpt2``): the file's merges and its pre-tokenizer's split."""
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported (known: {sorted(GGUF_PRE_TOKENIZERS)})"
        )
    merges_raw = md.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    backend = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split_digits, split_regex = GGUF_PRE_TOKENIZERS[pre]
    steps: list[Any] = []
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split_regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split_regex), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend, True


def _spm_backend(
    md: Mapping[str, Any], vocab: dict[str, int], tokens: Sequence[str], types: Sequence[int]
) -> tuple[_HFTokenizer, bool]:
    """SentencePiece BPE (``llama``): merges derived from the scores (see :func:`spm_merges`).

    No pre-tokenizer splits the text: SentencePiece merges across spaces (Gemma has pieces
    spanning them), so each stretch between special tokens is one BPE word.
    """
    scores = md.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise ValueError("GGUF SentencePiece ('llama') tokenizer needs tokenizer.ggml.scores, one per token")
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    backend = _HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=spm_merges(tokens, scores, types),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=_TOKEN_BYTE in types,
        )
    )
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))  # llama.cpp's default for SPM
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPACE_PIECE, prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, False


#: ``tokenizer.ggml.model`` -> builder of the ``tokenizers`` backend (and whether it is byte-level).
_GGUF_BACKENDS = {"gpt2": _bpe_backend, "llama": _spm_backend}


def _post_processor(tokens: Sequence[str], bos: int | None, eos: int | None, byte_level: bool = True) -> Any:
    """BOS/EOS insertion as a template, so a saved ``tokenizer.json`` does it in any runtime
    (None: nothing to do)."""
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False) if byte_level else None
    pre = f"{tokens[bos]}:0 " if bos is not None else ""
    post = f" {tokens[eos]}:0" if eos is not None else ""
    pre_b = f" {tokens[bos]}:1" if bos is not None else ""
    post_b = f" {tokens[eos]}:1" if eos is not None else ""
    specials = [(tokens[i], i) for i in dict.fromkeys(x for x in (bos, eos) if x is not None)]
    return processors.TemplateProcessing(
        single=f"{pre}$A:0{post}",
        pair=f"{pre}$A:0{post}{pre_b} $B:1{post_b}",
        special_tokens=specials,
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def load_tokenizer(model_path: str | Path | None) -> Tokenizer:
    """The tokenizer of a model: a GGUF's metadata, or a folder's tokenizer files.

    ``None`` means the built-in SmolLM2 GGUF; a built-in model's name, that model.
    """
    from metal_marlin.assets import resolve_model_path

    path = resolve_model_path(model_path)
    if path.is_file():
        return Tokenizer.from_gguf(path)
    if path.is_dir():
        return Tokenizer.from_folder(path)
    raise FileNotFoundError(f"model path not found: {path}")
