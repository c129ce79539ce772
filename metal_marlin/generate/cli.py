"""``metal-marlin generate``: stream a completion of one prompt to the terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["run_generate"]


def run_generate(
    model: str | None,
    prompt: str,
    chat: bool,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    out: TextIO = sys.stdout,
    *,
    verbose: bool = False,
) -> int:
    """Generate for ``prompt`` with the model at ``model`` (None: built-in SmolLM2).

    Text is written to ``out`` as it is produced (flushed per token), then a newline.
    ``chat`` renders the prompt as one user message with the model's chat template.
    Bad arguments raise ValueError, a missing model FileNotFoundError, before the model is
    loaded where possible (the ``metal-marlin`` command prints them as one error line).
    ``verbose`` adds token counts and speed on stderr. Returns the exit status, 0.
    """
    from metal_marlin.generate.engine import Engine
    from metal_marlin.generate.sampling import SamplingParams

    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    params = SamplingParams(
        temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens
    ).validate()
    start = time.perf_counter()
    engine = Engine.load(model)
    loaded = time.perf_counter()
    if chat:
        events = engine.stream_chat([{"role": "user", "content": prompt}], params)
    else:
        events = engine.stream(prompt, params)
    text_end = "\n"
    first = last = None
    for event in events:
        now = time.perf_counter()
        first = first or now
        last = now
        if event.text:
            out.write(event.text)
            out.flush()
            text_end = "" if event.text.endswith("\n") else "\n"
        if event.finished:
            out.write(text_end)
            out.flush()
            if verbose:
                decode = (event.completion_tokens - 1) / (last - first) if last > first else 0.0
                print(
                    f"[{event.prompt_tokens} prompt tokens, {event.completion_tokens} generated, "
                    f"finish_reason={event.finish_reason}; load {loaded - start:.1f} s, "
                    f"first token {first - loaded:.2f} s, decode {decode:.1f} tokens/s]",
                    file=sys.stderr,
                )
    return 0
