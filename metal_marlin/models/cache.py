"""Key/value cache for incremental decoding.

Growing the cache by one token per step would reallocate and copy the whole history every
step (quadratic work, and allocator churn on Metal). Instead the buffers grow in fixed steps
(256 tokens by default) and the valid prefix ``[:offset]`` is handed to attention.

Layout is ``[B, n_kv_heads, T, head_dim]``, the layout attention consumes, so fetching the
valid prefix is a slice and not a transpose. All rows of a batch share one ``offset``;
left-padded batches keep their per-row positions in the model (see
``LlamaModel.__call__(left_padding=...)``), not here.
"""

from __future__ import annotations

import mlx.core as mx

DEFAULT_STEP = 256


class KVCache:
    """Preallocated, step-grown key/value store for one attention layer."""

    def __init__(self, step: int = DEFAULT_STEP) -> None:
        if step <= 0:
            raise ValueError(f"KVCache step must be positive, got {step}")
        self.step = step
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def capacity(self) -> int:
        """Tokens that fit before the next reallocation."""
        return 0 if self.keys is None else self.keys.shape[2]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        """Reallocate to the next multiple of ``step`` that holds ``needed`` tokens."""
        capacity = -(-needed // self.step) * self.step
        batch, heads, _, k_dim = keys.shape
        new_keys = mx.zeros((batch, heads, capacity, k_dim), dtype=keys.dtype)
        new_values = mx.zeros((batch, heads, capacity, values.shape[3]), dtype=values.dtype)
        if self.keys is not None and self.offset > 0:
            new_keys[:, :, : self.offset, :] = self.keys[:, :, : self.offset, :]
            new_values[:, :, : self.offset, :] = self.values[:, :, : self.offset, :]
        self.keys, self.values = new_keys, new_values

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``keys``/``values`` ``[B, H, L, D]`` and return the whole valid history.

        Returns ``(keys, values)`` of shape ``[B, H, offset, D]`` including the new tokens.
        """
        start = self.offset
        end = start + keys.shape[2]
        if self.keys is not None and (
            keys.shape[0] != self.keys.shape[0] or keys.shape[1] != self.keys.shape[1]
        ):
            raise ValueError(
                f"KVCache holds batch/heads {self.keys.shape[:2]}, got {keys.shape[:2]}"
            )
        if end > self.capacity:
            self._grow(keys, values, end)
        self.keys[:, :, start:end, :] = keys
        self.values[:, :, start:end, :] = values
        self.offset = end
        return self.keys[:, :, :end, :], self.values[:, :, :end, :]

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens (e.g. rejected draft tokens); returns how many went.

        The memory stays allocated; later updates overwrite it.
        """
        n = max(0, min(self.offset, int(n)))
        self.offset -= n
        return n

    def reset(self) -> None:
        """Drop all tokens but keep the buffers for reuse."""
        self.offset = 0

    @property
    def state(self) -> tuple[mx.array, mx.array] | tuple[None, None]:
        """The valid ``(keys, values)`` prefix, for inspection or saving."""
        if self.keys is None:
            return None, None
        return self.keys[:, :, : self.offset, :], self.values[:, :, : self.offset, :]

    @property
    def nbytes(self) -> int:
        """Bytes held by the (preallocated) buffers."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


def make_cache(num_layers: int, step: int = DEFAULT_STEP) -> list[KVCache]:
    """One fresh cache per decoder layer."""
    return [KVCache(step) for _ in range(num_layers)]
