"""Sampling parameters (OpenAI ranges) and a batched sampler over MLX logits.

``SamplingParams`` is plain Python so the service can validate requests without importing
MLX (only the worker touches the accelerator); ``mlx`` is imported when a sampler runs.

Per step and per row, the :class:`Sampler` does, in this order:

1. ``logit_bias`` is added to the raw logits (OpenAI: "added to the logits ... prior to
   sampling"; -100 effectively bans a token, +100 effectively forces it).
2. Repetition penalty as in CTRL / Hugging Face: every token already seen (prompt and output,
   as HF and vLLM do) has a positive logit divided by ``repetition_penalty``, a negative one
   multiplied by it.
3. Presence / frequency penalties as in OpenAI, on *generated* tokens only:
   ``logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)``.
4. Logprobs are taken here: the log-softmax of these processed logits, before temperature and
   truncation. That is the model's distribution as adjusted by the request (a banned token
   really shows as impossible) and the same quantity at every temperature, so logprobs of
   greedy and sampled runs compare; after truncation most alternatives would be -inf.
5. Temperature (0 means greedy: argmax of the processed logits), then ``top_k``, ``top_p``
   (nucleus on the distribution left by ``top_k``) and ``min_p`` (keep tokens whose
   probability is at least ``min_p`` times the most likely one's), then a categorical draw.

Randomness is per row: each sequence owns a PRNG key, from ``mx.random.key(seed)`` (a random
seed when none is given, recorded in :attr:`SamplingState.seed`), split once per step. Draws
use the Gumbel-max trick with noise from the row's own key, and the code path a row takes
(see :class:`Sampler`) is chosen from its own params and logits only, so a row's tokens never
depend on what else shares the batch.

Logprobs cost a log-softmax over the vocabulary, so they are computed only for rows that ask
(``logprobs`` not None; 0 means "the chosen token's logprob, no alternatives").
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlx.core as mx

__all__ = ["MAX_TOP_LOGPROBS", "SampleOutput", "Sampler", "SamplingParams", "SamplingState"]

MAX_TOP_LOGPROBS = 20
_U64 = 2**64


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; defaults follow the OpenAI API."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # OpenAI accepts a single stop string, and JSON object keys of logit_bias are strings.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.logit_bias is None:
            self.logit_bias = {}
        elif isinstance(self.logit_bias, Mapping):
            converted: dict[Any, Any] = {}
            for key, value in self.logit_bias.items():
                if isinstance(key, str) and key.strip().lstrip("-").isdigit():
                    key = int(key)
                converted[key] = value
            self.logit_bias = converted

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ``ValueError("<param> ... got <value>")`` for anything out of range.

        ``vocab_size`` (when known) bounds the token ids in ``logit_bias`` and
        ``stop_token_ids``. Returns ``self`` so calls can be chained.
        """

        def bad(name: str, value: Any, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {value!r}")

        t = self.temperature
        if not _is_number(t) or not 0.0 <= t <= 2.0:
            raise bad("temperature", t, "a number in [0, 2]")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", self.top_k, "an integer >= 0 (0 disables it)")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", self.min_p, "a number in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", self.seed, "an integer or null")
        rp = self.repetition_penalty
        if not _is_number(rp) or rp <= 0:
            raise bad("repetition_penalty", rp, "a number > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise bad(name, value, "a number in [-2, 2]")
        if not isinstance(self.logit_bias, Mapping):
            raise bad("logit_bias", self.logit_bias, "a map of token id to bias")
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0 or (vocab_size is not None and token >= vocab_size):
                limit = f" below {vocab_size}" if vocab_size is not None else ""
                raise bad("logit_bias", token, f"keyed by token ids >= 0{limit}")
            if not _is_number(bias) or not -100.0 <= bias <= 100.0:
                raise bad(f"logit_bias[{token}]", bias, "a number in [-100, 100]")
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise bad("max_tokens", self.max_tokens, "an integer >= 0")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", self.stop, "a string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(i) and i >= 0 and (vocab_size is None or i < vocab_size) for i in self.stop_token_ids
        ):
            raise bad("stop_token_ids", self.stop_token_ids, "a list of valid token ids")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise bad("logprobs", self.logprobs, f"null or an integer in [0, {MAX_TOP_LOGPROBS}]")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", self.ignore_eos, "a boolean")
        return self


class SamplingState:
    """One sequence's sampler state: its params, PRNG key and the token history penalties need.

    ``prompt_tokens`` count for the repetition penalty only (as in HF/vLLM); presence and
    frequency penalties use generated tokens, as OpenAI defines them.
    """

    def __init__(
        self, params: SamplingParams, prompt_tokens: Iterable[int] = (), vocab_size: int | None = None
    ) -> None:
        import mlx.core as mx

        self.params = params.validate(vocab_size)
        #: The seed actually used (a fresh random one when ``params.seed`` is None), so a
        #: response can be reproduced.
        self.seed: int = params.seed if params.seed is not None else secrets.randbits(63)
        self.key: mx.array = mx.random.key(self.seed % _U64)
        self.seen: set[int] = set(int(t) for t in prompt_tokens)
        self.output_counts: dict[int, int] = {}
        self.output_tokens: list[int] = []

    def append(self, token: int) -> None:
        """Record a generated token (the sampler does this for the tokens it returns)."""
        token = int(token)
        self.output_tokens.append(token)
        self.output_counts[token] = self.output_counts.get(token, 0) + 1
        self.seen.add(token)


@dataclass
class SampleOutput:
    """Per-row results of one step, as Python values (the caller needs them on the host)."""

    tokens: list[int]
    #: Log-probability of each chosen token under the processed distribution (see module
    #: doc); None for rows whose params.logprobs is None (it costs a pass over the vocab).
    logprobs: list[float | None]
    #: Per row: the ``params.logprobs`` most likely (token, logprob), best first, or None.
    top_logprobs: list[list[tuple[int, float]] | None]


class PendingSample:
    """One step's sampling graph (from :meth:`Sampler.draw`): ``tokens`` is a lazy int32
    ``[B]`` array; :meth:`resolve` evaluates it and returns the host values."""

    def __init__(self, tokens: Any, next_keys: Any, chosen: Any, top_idx: Any, top_val: Any,
                 lp_rows: list[int], params: list[SamplingParams], states: list[SamplingState]) -> None:
        self.tokens = tokens
        self.next_keys = next_keys
        self.chosen, self.top_idx, self.top_val = chosen, top_idx, top_val
        self.lp_rows, self.params, self.states = lp_rows, params, states

    def resolve(self, *, update: bool = True) -> SampleOutput:
        """Evaluate; with ``update`` each state records its token and advances its key."""
        import mlx.core as mx

        tokens, next_keys, chosen, top_idx, top_val = self.tokens, self.next_keys, self.chosen, self.top_idx, self.top_val
        lp_rows, params, states, batch = self.lp_rows, self.params, self.states, len(self.states)
        mx.eval(tokens, next_keys, *(a for a in (chosen, top_idx, top_val) if a is not None))

        token_list = tokens.tolist()
        out = SampleOutput(tokens=token_list, logprobs=[None] * batch, top_logprobs=[None] * batch)
        if chosen is not None:
            chosen_list = chosen.tolist()
            idx_rows = top_idx.tolist() if top_idx is not None else None
            val_rows = top_val.tolist() if top_val is not None else None
            for r in lp_rows:
                out.logprobs[r] = chosen_list[r]
                n = params[r].logprobs or 0
                if n and idx_rows is not None and val_rows is not None:
                    pairs = sorted(zip(idx_rows[r], val_rows[r]), key=lambda iv: (-iv[1], iv[0]))
                    out.top_logprobs[r] = pairs[:n]
                else:
                    out.top_logprobs[r] = []
        if update:
            for r, st in enumerate(states):
                st.key = next_keys[r]
                st.append(token_list[r])
        return out


def _row_take(x: mx.array, rows: list[int], batch: int) -> mx.array:
    import mlx.core as mx

    return x if len(rows) == batch else x[mx.array(rows)]


def _gumbel(keys: mx.array, width: int) -> mx.array:
    """Gumbel noise ``[n, width]``, row i drawn from ``keys[i]`` alone."""
    import mlx.core as mx

    return mx.vmap(lambda k: mx.random.gumbel((width,), key=k))(keys)


def _truncates_by_rank(p: SamplingParams, vocab: int) -> bool:
    return p.temperature > 0 and (0 < p.top_k < vocab or p.top_p < 1.0)


class Sampler:
    """Pick the next token for every row of a batch of logits ``[B, V]``.

    Rows take one of three paths, chosen from their own params and logits only (never from
    the rest of the batch, so batching does not change a seeded row's tokens):

    - greedy (temperature 0): argmax;
    - no top_k/top_p: Gumbel-max over the whole vocabulary (min_p is a threshold on it);
    - top_k/top_p: rank only the ``candidates`` best tokens (a partition plus a small sort)
      instead of sorting the vocabulary, which on a CPU costs ~10x more. This is exact when
      the truncated set lies inside the candidates: always for ``top_k <= candidates``, and
      for top_p when the candidates hold at least ``top_p`` of the probability; otherwise
      the row is redone with a full sort.
    """

    def __init__(self, candidates: int = 1024) -> None:
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.candidates = candidates

    def __call__(
        self, logits: mx.array, states: Sequence[SamplingState], *, update: bool = True
    ) -> SampleOutput:
        return self.sample(logits, states, update=update)

    def sample(
        self, logits: mx.array, states: Sequence[SamplingState], *, update: bool = True
    ) -> SampleOutput:
        """Sample one token per row; with ``update`` each state records its token and key."""
        return self.draw(logits, states).resolve(update=update)

    def draw(self, logits: mx.array, states: Sequence[SamplingState]) -> PendingSample:
        """The sampling graph of one step, not evaluated yet (see :class:`PendingSample`).

        Why split: a decoder can feed ``tokens`` (lazy) into the next forward and start the
        GPU on it before the host reads this step's tokens, hiding the host's work behind
        the device's (what mlx-lm calls async generation)."""
        import mlx.core as mx

        if logits.ndim != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if batch != len(states):
            raise ValueError(f"{batch} rows of logits but {len(states)} sampling states")
        for r, st in enumerate(states):
            over = [t for t in st.params.logit_bias if t >= vocab]
            if over:
                raise ValueError(f"logit_bias token id {over[0]} is outside the vocabulary ({vocab}) in row {r}")
        params = [st.params for st in states]
        x = self.process_logits(logits.astype(mx.float32), states)

        # Split every row's key every step, greedy or not, so a row's stream of randomness
        # depends only on its own seed and step count.
        split = mx.vmap(mx.random.split)(mx.stack([st.key for st in states]))  # [B, 2, 2]
        next_keys, step_keys = split[:, 0], split[:, 1]

        groups: list[tuple[list[int], mx.array]] = []
        greedy = [r for r, p in enumerate(params) if p.temperature == 0]
        plain = [r for r, p in enumerate(params) if p.temperature > 0 and not _truncates_by_rank(p, vocab)]
        ranked = [r for r, p in enumerate(params) if _truncates_by_rank(p, vocab)]
        if greedy:
            groups.append((greedy, mx.argmax(_row_take(x, greedy, batch), axis=-1)))
        if plain:
            groups.append((plain, self._sample_plain(x, plain, params, step_keys)))
        if ranked:
            groups.extend(self._sample_ranked(x, ranked, params, step_keys))
        order = [r for rows, _ in groups for r in rows]
        tokens = mx.concatenate([t.astype(mx.int32) for _, t in groups])
        if order != list(range(batch)):
            inverse = sorted(range(batch), key=order.__getitem__)
            tokens = tokens[mx.array(inverse)]

        lp_rows = [r for r, p in enumerate(params) if p.logprobs is not None]
        n_top = max((p.logprobs or 0) for p in params)
        chosen = top_idx = top_val = None
        if lp_rows:
            logprobs = x - mx.logsumexp(x, axis=-1, keepdims=True)
            chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
            if n_top:
                top_idx = mx.argpartition(-logprobs, kth=n_top - 1, axis=-1)[:, :n_top]
                top_val = mx.take_along_axis(logprobs, top_idx, axis=-1)
        return PendingSample(tokens, next_keys, chosen, top_idx, top_val, lp_rows, params, list(states))

    @staticmethod
    def process_logits(logits: mx.array, states: Sequence[SamplingState]) -> mx.array:
        """Apply logit_bias, then repetition, presence and frequency penalties (steps 1-3).

        Only the touched (row, token) entries are gathered and scattered, so the cost grows
        with the number of distinct tokens seen, not with the vocabulary.
        """
        import mlx.core as mx

        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for r, st in enumerate(states):
            for token, bias in st.params.logit_bias.items():
                rows.append(r)
                cols.append(token)
                vals.append(float(bias))
        if rows:
            logits = logits.at[mx.array(rows), mx.array(cols)].add(mx.array(vals, dtype=logits.dtype))

        rows, cols, vals = [], [], []
        for r, st in enumerate(states):
            penalty = st.params.repetition_penalty
            if penalty != 1.0 and st.seen:
                seen = sorted(st.seen)
                rows.extend([r] * len(seen))
                cols.extend(seen)
                vals.extend([float(penalty)] * len(seen))
        if rows:
            ri, ci = mx.array(rows), mx.array(cols)
            current = logits[ri, ci]
            penalty_arr = mx.array(vals, dtype=logits.dtype)
            logits[ri, ci] = mx.where(current > 0, current / penalty_arr, current * penalty_arr)

        rows, cols, vals = [], [], []
        for r, st in enumerate(states):
            pres, freq = st.params.presence_penalty, st.params.frequency_penalty
            if (pres or freq) and st.output_counts:
                for token, count in st.output_counts.items():
                    rows.append(r)
                    cols.append(token)
                    vals.append(-(freq * count + pres))
        if rows:
            logits = logits.at[mx.array(rows), mx.array(cols)].add(mx.array(vals, dtype=logits.dtype))
        return logits

    @staticmethod
    def _column(values: list[float], dtype: Any = None) -> mx.array:
        import mlx.core as mx

        return mx.array(values, dtype=dtype or mx.float32)[:, None]

    def _sample_plain(
        self, x: mx.array, rows: list[int], params: Sequence[SamplingParams], keys: mx.array
    ) -> mx.array:
        """Temperature (and min_p) over the whole vocabulary, noise indexed by token id."""
        import mlx.core as mx

        sub = _row_take(x, rows, x.shape[0])
        scaled = sub / self._column([params[r].temperature for r in rows])
        if any(params[r].min_p > 0 for r in rows):
            floor = self._column([math.log(params[r].min_p) if params[r].min_p > 0 else -math.inf for r in rows])
            scaled = mx.where(scaled >= mx.max(scaled, axis=-1, keepdims=True) + floor, scaled, -mx.inf)
        noise = _gumbel(_row_take(keys, rows, x.shape[0]), x.shape[1])
        return mx.argmax(scaled + noise, axis=-1)

    def _sample_ranked(
        self, x: mx.array, rows: list[int], params: Sequence[SamplingParams], keys: mx.array
    ) -> list[tuple[list[int], mx.array]]:
        """top_k / top_p / min_p rows: candidates first, full sort for rows they don't cover."""
        import mlx.core as mx

        vocab = x.shape[1]
        width = min(self.candidates, vocab)
        fits = [r for r in rows if params[r].top_k <= width or params[r].top_k >= vocab]
        full = [r for r in rows if r not in fits]
        out: list[tuple[list[int], mx.array]] = []
        if fits and width < vocab:
            tokens, covered = self._rank_and_draw(x, fits, params, keys, width)
            if any(params[r].top_k == 0 or params[r].top_k >= vocab for r in fits):
                mx.eval(covered)  # a host decision: which rows need the full sort
                ok = covered.tolist()
                full += [r for r, c in zip(fits, ok) if not c]
                kept = [i for i, c in enumerate(ok) if c]
                if len(kept) < len(fits):
                    fits = [fits[i] for i in kept]
                    tokens = tokens[mx.array(kept)] if kept else tokens
            if fits:
                out.append((fits, tokens))
        else:
            full += fits
        if full:
            out.append((full, self._rank_and_draw(x, full, params, keys, vocab)[0]))
        return out

    def _rank_and_draw(
        self, x: mx.array, rows: list[int], params: Sequence[SamplingParams], keys: mx.array, width: int
    ) -> tuple[mx.array, mx.array]:
        """Draw from the ``width`` best tokens; return (tokens, whether top_p was covered).

        Probabilities are normalised over the top_k set (all inside the candidates) or, without
        top_k, over the whole vocabulary, so top_p's cut is the same as with a full sort.
        """
        import mlx.core as mx

        batch, vocab = x.shape
        ps = [params[r] for r in rows]
        scaled = _row_take(x, rows, batch) / self._column([p.temperature for p in ps])
        if width >= vocab:
            idx = mx.argsort(-scaled, axis=-1)
        else:
            cand = mx.argpartition(-scaled, kth=width - 1, axis=-1)[:, :width]
            idx = mx.take_along_axis(cand, mx.argsort(-mx.take_along_axis(scaled, cand, axis=-1), axis=-1), axis=-1)
        ranked = mx.take_along_axis(scaled, idx, axis=-1)  # descending
        rank = mx.arange(width)[None, :]
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in ps]
        k_col = self._column([k or vocab for k in top_k], mx.int32)
        keep = rank < k_col
        if all(top_k):
            lse = mx.logsumexp(mx.where(keep, ranked, -mx.inf), axis=-1, keepdims=True)
        elif not any(top_k):
            lse = mx.logsumexp(scaled, axis=-1, keepdims=True)
        else:
            lse = mx.where(
                self._column([1.0 if k else 0.0 for k in top_k]) > 0,
                mx.logsumexp(mx.where(keep, ranked, -mx.inf), axis=-1, keepdims=True),
                mx.logsumexp(scaled, axis=-1, keepdims=True),
            )
        probs = mx.where(keep, mx.exp(ranked - lse), 0.0)
        cum = mx.cumsum(probs, axis=-1)
        top_p = self._column([p.top_p for p in ps])
        # The best token always survives; top_p = 1 must not drop a float-rounded tail.
        keep = keep & ((cum - probs < top_p) | (top_p >= 1.0) | (rank == 0))
        floor = self._column([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in ps])
        keep = keep & (ranked >= ranked[:, :1] + floor)
        covered = (k_col[:, 0] < vocab) | (top_p[:, 0] >= 1.0) | (cum[:, -1] >= top_p[:, 0])
        noise = _gumbel(_row_take(keys, rows, batch), width)
        pick = mx.argmax(mx.where(keep, ranked, -mx.inf) + noise, axis=-1)
        return mx.take_along_axis(idx, pick[:, None], axis=-1)[:, 0], covered
