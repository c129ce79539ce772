"""Perplexity over fixed, non-overlapping windows of held-out text.

Windows are cut from the tokenized held-out Wikipedia split, the out-of-domain King James
Bible text (``corpus="kjv"``), or a given text file, at
fixed offsets, so every model evaluated on the same tokenizer sees exactly the same
windows; each window predicts its tokens 2..N from the preceding ones (no context
carried across windows).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import mlx.core as mx
import numpy as np

from metal_marlin.calibration import cut_rows, kjv_first_chapters, leading_bos, token_stream, wikipedia_text

DEFAULT_WINDOW = 512
Corpus = Literal["wikipedia", "kjv"]
CORPORA: tuple[str, ...] = ("wikipedia", "kjv")


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    n_windows: int
    n_predicted_tokens: int
    window: int
    source: str
    standard_error: float = float("nan")
    """Of the perplexity: windows are the independent units (tokens within one are not), so it is
    ``perplexity * std(window mean NLL) / sqrt(n_windows)``, the delta method on ``exp``; NaN for
    one window. Two models on the same windows differ by more than noise when their gap is well
    above this."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluation_windows(
    tokenizer: Any,
    window: int = DEFAULT_WINDOW,
    max_windows: int | None = None,
    text_path: str | Path | None = None,
    corpus: Corpus = "wikipedia",
) -> tuple[np.ndarray, str]:
    """``int32 [n_windows, window]`` from ``text_path`` if given, else the built-in ``corpus``;
    each window starts with the BOS token when the tokenizer adds one (see
    :func:`metal_marlin.calibration.cut_rows`)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2, got {window!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive integer, got {max_windows!r}")
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    if text_path is None and corpus == "wikipedia":
        documents, source = wikipedia_text("evaluation"), "held-out Wikipedia split"
    elif text_path is None:
        documents, source = list(kjv_first_chapters()), "King James Bible, chapter 1 of every book"
    else:
        path = Path(text_path)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation text file not found: {path}")
        documents, source = [path.read_text(encoding="utf-8")], str(path)
    bos = leading_bos(tokenizer)
    body = window if bos is None else window - 1
    limit = None if max_windows is None else max_windows * body
    stream = token_stream(tokenizer, documents, limit)
    n = stream.size // body if max_windows is None else min(max_windows, stream.size // body)
    if n == 0:
        raise ValueError(f"{source} has {stream.size} tokens, fewer than one window of {window}")
    return cut_rows(stream, n, window, bos), source


def perplexity(
    model: Callable[[mx.array], mx.array],
    windows: np.ndarray,
    source: str = "",
    batch_size: int = 4,
) -> PerplexityResult:
    """exp(mean negative log-likelihood) of ``windows`` under ``model`` (logits [B, L, V])."""
    window_nll: list[np.ndarray] = []  # mean NLL of each window
    count = 0
    for start in range(0, windows.shape[0], batch_size):
        batch = mx.array(windows[start : start + batch_size])
        logits = model(batch[:, :-1]).astype(mx.float32)
        targets = batch[:, 1:]
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(log_probs, targets[..., None], axis=-1).squeeze(-1)
        window_nll.append(np.array(mx.mean(nll, axis=-1), dtype=np.float64))
        count += int(targets.size)
    per_window = np.concatenate(window_nll)
    mean = float(per_window.mean())  # every window predicts the same number of tokens
    ppl = math.exp(mean)
    se = ppl * float(per_window.std(ddof=1)) / math.sqrt(per_window.size) if per_window.size > 1 else float("nan")
    return PerplexityResult(ppl, mean, int(windows.shape[0]), count, int(windows.shape[1]), source, se)


def evaluate_model(
    model_path: str | Path | None,
    window: int = DEFAULT_WINDOW,
    max_windows: int | None = None,
    text_path: str | Path | None = None,
    batch_size: int = 4,
    *,
    corpus: Corpus = "wikipedia",
) -> PerplexityResult:
    """Load a model (None = built-in SmolLM2) and measure its perplexity."""
    from metal_marlin.checkpoints.loader import load_builtin_model, load_model
    from metal_marlin.tokenizer import load_tokenizer

    windows, source = evaluation_windows(load_tokenizer(model_path), window, max_windows, text_path, corpus)
    model = (load_builtin_model() if model_path is None else load_model(model_path)).model
    return perplexity(model, windows, source, batch_size)
