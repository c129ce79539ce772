"""The worker's internal HTTP API: request/response shapes shared with the service.

Generation is ``POST /generate`` with a :class:`GenerateRequest`. Problems found before any
token is produced (unknown model, bad parameters, prompt too long) come back as an ordinary
JSON error response (``{"error": {...}}`` with a 4xx/5xx status). Otherwise the response is
NDJSON (``application/x-ndjson``), one :class:`StreamLine` per line:

- ``{"event": "start", "prompt_tokens": n, "prompt_text": "..."}`` once;
- ``{"event": "token", "text": ..., "token_id": ..., ...}`` per sampled token;
- ``{"event": "done", "finish_reason": ..., "usage": {...}}`` last; or
- ``{"event": "error", "error": {...}}`` if generation fails midway.

Pure pydantic (no MLX, no FastAPI): the service imports it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

WORKER_TOKEN_HEADER = "X-MM-Worker-Token"
NDJSON = "application/x-ndjson"


class WorkerSamplingParams(BaseModel):
    """The fields of :class:`metal_marlin.generate.sampling.SamplingParams`."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = Field(default_factory=dict)
    #: None: as many as the context allows (OpenAI chat's default).
    max_tokens: int | None = 16
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    logprobs: int | None = None
    ignore_eos: bool = False


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    #: Text or token ids; exactly one of ``prompt`` and ``messages``.
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    params: WorkerSamplingParams = Field(default_factory=WorkerSamplingParams)
    #: Return the prompt's text in the start line (for ``echo``).
    want_prompt_text: bool = False
    request_id: str | None = None


class TopLogprob(BaseModel):
    token_id: int
    token: str
    bytes: list[int]
    logprob: float


class StreamLine(BaseModel):
    event: Literal["start", "token", "done", "error"]
    # start
    prompt_tokens: int | None = None
    prompt_text: str | None = None
    # token
    text: str | None = None
    token_id: int | None = None
    token: str | None = None
    bytes: list[int] | None = None
    logprob: float | None = None
    top_logprobs: list[TopLogprob] | None = None
    # done
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    usage: dict[str, int] | None = None
    # error
    error: dict[str, Any] | None = None


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    pid: int
    worker_id: str
    jobs_enabled: bool
    current_job: str | None
    loaded_models: list[str]
    active_requests: int
    #: :func:`metal_marlin.device.device_info`: ``device`` ("gpu"/"cpu"), ``backend``
    #: ("cuda"/"metal"/"cpu"), ``device_name``, ``memory_bytes``, versions.
    device_info: dict[str, Any] | None = None
    #: Sequences one decode step batches (``MM_MAX_BATCH_SIZE``; 128 on a GPU, 16 on a CPU):
    #: the gateway admits twice this many generation requests unless told otherwise.
    max_batch_size: int | None = None
    #: The loaded models' scheduler counters added up
    #: (:func:`metal_marlin.generate.scheduler.merge_stats`; an unloaded model's go with it):
    #: ``steps``, ``decode_steps``, ``decode_tokens``, ``decode_time`` (s), ``prefill_tokens``,
    #: ``prefill_time`` (s), ``finished``, ``cancelled``, ``errors``, and how fast cancellation
    #: works: ``cancel_lag_steps_hist`` (decode steps between a request's cancellation and its
    #: retirement, buckets ``"0"``, ``"1"``, ``"2"``, ``">2"``) and ``cancel_lag_steps_max``.
    generation: dict[str, Any] | None = None
    #: Local models this worker serves by name (``--model``): a gateway fronting several
    #: workers lists their union and routes a name to the workers that have it.
    served_models: list[str] = []
    #: What is left of its loaded models' memory budget, in bytes (routing prefers more).
    free_bytes: int | None = None


class LoadedModelInfo(BaseModel):
    id: str
    bytes: int
    active_requests: int
    last_used: float


class LoadedModelsResponse(BaseModel):
    budget_bytes: int
    used_bytes: int
    data: list[LoadedModelInfo]
