"""Models for generation: loaded on first use, evicted least-recently-used under a memory budget.

A model id is a built-in model's name (``smollm2-135m-instruct``, the default, or
``gemma-3-270m`` where its package is installed), the id of a succeeded
quantization job (its folder ``<data>/jobs/<id>/``), or the name of a model the operator
registered (``--model NAME=PATH``, see :mod:`worker.served`). Each loaded model is an
:class:`~metal_marlin.generate.engine.Engine` with its own
:class:`~metal_marlin.generate.scheduler.BatchScheduler` (continuous batching thread).

Memory: a model's size is estimated from its files before loading (so room can be made
first) and measured from its parameters after. Loading a model evicts idle models, least
recently used first, until the budget holds; models with requests in flight are never
evicted. A model that cannot fit is refused (503), never loaded over the budget.

Errors reach clients, so they name a model by its id, never its path: a known model whose
files are gone raises :class:`ModelFilesMissing` (409), one whose files do not load
:class:`ModelLoadFailed` (500); the path and the cause go to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobstore import JobStore, is_job_id
from jobstore.layout import result_dir, results_cache_dir
from jobstore.results import LocalResults, ResultStore
from metal_marlin import device
from metal_marlin.assets import BUILTIN_MODEL_NAME, BUILTIN_MODELS, builtin_model_installed, builtin_model_path

log = logging.getLogger("metal_marlin.worker.models")

MIB = 1 << 20


WARMUP_BATCH_SIZES = (1, 2, 3, 4, 8, 16, 32, 64, 128)
"""Decode batch sizes whose kernels a GPU worker compiles when it loads a model."""


class ModelNotFound(Exception):
    pass


class ModelFilesMissing(ModelNotFound):
    """A known model (served, or a succeeded job) whose files are gone from disk (maps to 409).

    Like every registry error, its message names the model by id only: it goes to the client,
    and the path is logged instead."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"the files of model {model_id!r} are no longer on the server; it cannot be used")


class ModelLoadFailed(Exception):
    """The model's files are there but do not load (corrupt, unsupported); maps to 500."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"could not load model {model_id!r}: its files are not a model this server can load (the server log has the details)")


class ModelUnavailable(Exception):
    """The model cannot be loaded within the memory budget right now (maps to 503)."""


@dataclass
class LoadedModel:
    id: str
    path: Path | None
    engine: Any
    scheduler: Any
    nbytes: int
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)
    _token_text: dict[int, tuple[str, list[int]]] = field(default_factory=dict)

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """The text of one token and its UTF-8 bytes (for logprobs)."""
        cached = self._token_text.get(token_id)
        if cached is None:
            text = self.engine.tokenizer.decode([token_id])
            cached = (text, list(text.encode("utf-8")))
            if len(self._token_text) < 200_000:
                self._token_text[token_id] = cached
        return cached

    def close(self) -> None:
        self.scheduler.shutdown(wait=True, timeout=10.0)


def _files_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _is_quantized_folder(path: Path) -> bool:
    """MLX-layout quantized (ours, mlx-lm's) or AutoAWQ, judged by config.json."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # the larger estimate; loading will tell
    return bool(config.get("quantization") or config.get("quantization_config"))


def _param_bytes(engine: Any) -> int:
    from mlx.utils import tree_flatten

    return int(sum(v.nbytes for _, v in tree_flatten(engine.model.parameters())))


class ModelRegistry:
    def __init__(
        self,
        data_dir: Path,
        store: JobStore,
        budget_bytes: int,
        *,
        max_batch_size: int = 16,
        served: Mapping[str, Path] | None = None,
        results: ResultStore | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.store = store
        #: where job results come from; a shared store's results are fetched into ``<data>/cache/results``
        self.results = results if results is not None else LocalResults(self.data_dir)
        self.served = dict(served or {})
        self.budget_bytes = int(budget_bytes)
        self.max_batch_size = max_batch_size
        self._models: dict[str, LoadedModel] = {}
        self._doomed: set[str] = set()
        self._measured: dict[str, int] = {}
        self._load_lock = asyncio.Lock()

    # -- lookup ---------------------------------------------------------------------------
    def resolve(self, model_id: str) -> Path | None:
        """Path to load for ``model_id`` (None: the default built-in model); ModelNotFound
        for an unknown id (a built-in model whose package is not installed included),
        ModelFilesMissing for a known one whose files were removed."""
        if model_id == BUILTIN_MODEL_NAME:
            return None
        if model_id in BUILTIN_MODELS:
            if not builtin_model_installed(model_id):
                raise ModelNotFound(f"the model {model_id!r} does not exist (its package is not installed on this server)")
            return builtin_model_path(model_id)
        path, present = None, False
        if model_id in self.served:
            path = self.served[model_id]
            present = path.exists()
        elif is_job_id(model_id):
            job = self.store.get(model_id)
            if job is not None and job.status == "succeeded":
                folder = self.results.local_folder(model_id, results_cache_dir(self.data_dir))
                path, present = (folder, True) if folder is not None else (result_dir(self.data_dir, model_id), False)
        if path is None:
            raise ModelNotFound(f"the model {model_id!r} does not exist")
        if not present:
            log.warning("model %s cannot be used: its files are gone from %s", model_id, path)
            raise ModelFilesMissing(model_id)
        return path

    def estimate_bytes(self, model_id: str, path: Path | None) -> int:
        if model_id in self._measured:
            return self._measured[model_id]
        if path is None or path.is_file():
            # a GGUF dequantized to float32: ~6-8x the file size of a 4-bit one (the measured
            # size replaces this estimate once loaded)
            return 7 * (builtin_model_path() if path is None else path).stat().st_size
        size = _files_size(path)
        if not _is_quantized_folder(path):  # float16/bfloat16 tensors are loaded as float32
            return 2 * size
        # packed int4 stays packed, plus (on the CPU backend) a float32 copy of it, 8 bytes per
        # stored int4 byte; float16 tensors beside it are loaded as float32 (x2)
        from metal_marlin.generate.engine import dense_cpu_weights_default

        return 2 * size + (8 * size if dense_cpu_weights_default() else 0)

    @property
    def used_bytes(self) -> int:
        return sum(m.nbytes for m in self._models.values())

    def loaded(self) -> list[LoadedModel]:
        return sorted(self._models.values(), key=lambda m: m.last_used)

    # -- acquire / release ----------------------------------------------------------------
    async def acquire(self, model_id: str) -> LoadedModel:
        """The loaded model, marked in use (call :meth:`release` when done)."""
        path = await asyncio.to_thread(self.resolve, model_id)  # also re-checks a job still exists
        entry = self._models.get(model_id)
        if entry is None:
            async with self._load_lock:
                entry = self._models.get(model_id)
                if entry is None:
                    entry = await self._load(model_id, path)
        self._doomed.discard(model_id)  # wanted again (and it still exists): keep it
        entry.active += 1
        entry.last_used = time.monotonic()
        return entry

    def release(self, entry: LoadedModel) -> None:
        entry.active = max(0, entry.active - 1)
        entry.last_used = time.monotonic()
        if entry.active == 0 and entry.id in self._doomed:
            self._evict(entry.id)

    def unload(self, model_id: str) -> bool:
        """Unload now if idle, else as soon as its last request ends. False if not loaded."""
        entry = self._models.get(model_id)
        if entry is None:
            return False
        if entry.active == 0:
            self._evict(model_id)
        else:
            self._doomed.add(model_id)
        return True

    def close_all(self) -> None:
        for model_id in list(self._models):
            self._evict(model_id)

    # -- internals ------------------------------------------------------------------------
    def _evict(self, model_id: str) -> None:
        entry = self._models.pop(model_id, None)
        self._doomed.discard(model_id)
        if entry is None:
            return
        log.info("unloading model %s (%.0f MiB)", model_id, entry.nbytes / MIB)
        try:
            entry.close()
        finally:
            import mlx.core as mx

            mx.clear_cache()

    def _make_room(self, need: int, keep: str | None = None) -> None:
        if need > self.budget_bytes:
            raise ModelUnavailable(
                f"the model needs about {need / MIB:.0f} MiB, more than the worker's memory budget "
                f"of {self.budget_bytes / MIB:.0f} MiB (MM_WORKER_MEMORY_MB)"
            )
        for entry in self.loaded():  # least recently used first
            if self.used_bytes + need <= self.budget_bytes:
                return
            if entry.active == 0 and entry.id != keep:
                self._evict(entry.id)
        if self.used_bytes + need > self.budget_bytes:
            raise ModelUnavailable(
                f"not enough memory budget to load the model now ({need / MIB:.0f} MiB needed, "
                f"{(self.budget_bytes - self.used_bytes) / MIB:.0f} MiB free, the rest is serving requests); retry later"
            )

    async def _load(self, model_id: str, path: Path | None) -> LoadedModel:
        """Load under the budget. A failure becomes ModelFilesMissing or ModelLoadFailed, whose
        messages hold no path or exception text (loaders name files in theirs); the cause is
        logged here with the path."""
        where = path or "the built-in GGUF"
        try:
            self._make_room(self.estimate_bytes(model_id, path))
            log.info("loading model %s from %s", model_id, where)
            started = time.monotonic()
            entry = await asyncio.to_thread(self._load_sync, model_id, path)
        except ModelUnavailable:
            raise
        except FileNotFoundError as exc:
            log.warning("model %s: files missing under %s: %s", model_id, where, exc)
            raise ModelFilesMissing(model_id) from exc
        except Exception as exc:
            log.exception("could not load model %s from %s", model_id, where)
            raise ModelLoadFailed(model_id) from exc
        self._measured[model_id] = entry.nbytes
        self._models[model_id] = entry
        log.info("loaded model %s: %.0f MiB in %.1f s", model_id, entry.nbytes / MIB, time.monotonic() - started)
        if self.used_bytes > self.budget_bytes:  # the estimate was low: evict others, never this one
            try:
                self._make_room(0, keep=model_id)
            except ModelUnavailable:
                log.warning("memory budget exceeded by %.0f MiB", (self.used_bytes - self.budget_bytes) / MIB)
        return entry

    def _load_sync(self, model_id: str, path: Path | None) -> LoadedModel:
        from metal_marlin.generate.engine import Engine
        from metal_marlin.generate.scheduler import BatchScheduler

        engine = Engine.load(path, max_batch_size=self.max_batch_size)
        if device.on_gpu():  # compile every kernel shape now, not in a request (see Engine.warmup)
            sizes = [b for b in WARMUP_BATCH_SIZES if b <= self.max_batch_size]
            log.info("warmed up %s's GPU kernels (batch sizes %s) in %.1f s", model_id, sizes, engine.warmup(sizes))
        scheduler = BatchScheduler(engine)
        return LoadedModel(model_id, path, engine, scheduler, _param_bytes(engine) + engine.dense_weight_bytes)
