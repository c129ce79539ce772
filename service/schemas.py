"""Pydantic models of every request and response body of the public API."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from jobstore import FILE_PURPOSES, JOB_STATUSES
from jobstore.layout import EXPORT_FORMATS
from metal_marlin.assets import BUILTIN_MODEL_NAME, BUILTIN_MODELS
from metal_marlin.calibration import DEFAULT_N_SAMPLES, DEFAULT_SEQ_LEN

# ---------------------------------------------------------------------------------------
# Quantization jobs
# ---------------------------------------------------------------------------------------
PathStr = Annotated[str, Field(min_length=1, max_length=4096)]
FileIdStr = Annotated[str, Field(pattern=r"^file-[0-9a-f]{24}$", description="The id of an uploaded file (POST /v1/files)")]


BuiltinModelName = Literal[tuple(BUILTIN_MODELS)]  # type: ignore[valid-type]


class BuiltinModelSource(BaseModel):
    """A built-in model: SmolLM2-135M-Instruct by default, or another by ``name``."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["builtin"] = "builtin"
    name: BuiltinModelName = Field(
        default=BUILTIN_MODEL_NAME,
        description="Which built-in model (GET /v1/models lists those installed on this server)",
    )


class PathModelSource(BaseModel):
    """A ``.gguf`` file or a Hugging Face folder under one of the server's model roots
    (absolute, or relative to a root)."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["path"]
    path: PathStr


class FileModelSource(BaseModel):
    """An uploaded ``.gguf`` file (``POST /v1/files`` with purpose ``model``)."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["file"]
    file_id: FileIdStr


ModelSourceObject = Union[BuiltinModelSource, PathModelSource, FileModelSource]
MODEL_SOURCE_TAGS = ("builtin", "path", "file")
MAX_MODEL_NAME_CHARS = 256
ModelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_MODEL_NAME_CHARS,
        description="A model by name, as OpenAI's jobs APIs take it: the built-in model's name or a served model's "
        "name (see `GET /v1/models`), or an uploaded model's file id (`file-...`, purpose `model`). A quantization "
        "job's id is refused with 400: its result is already quantized.",
    ),
]


def _model_source_tag(value: Any) -> str | None:
    """Which alternative a job's ``model`` is: a name (a string) or an object, told apart by
    its ``source``. None (a string no name can be, another type or an unknown source) gets
    one message on ``model`` itself that lists every accepted form, where a failed member
    would report a location the client never sent (``model.name``)."""
    if isinstance(value, str):
        return "name" if 0 < len(value) <= MAX_MODEL_NAME_CHARS else None
    source = value.get("source") if isinstance(value, dict) else getattr(value, "source", None)
    return source if source in MODEL_SOURCE_TAGS else None


# A callable discriminator, not ``Field(discriminator="source")``: a string has no ``source``.
# Tagged members keep error locations as before (``model.path.path``), not pydantic's union labels.
ModelSource = Annotated[
    Union[
        Annotated[BuiltinModelSource, Tag("builtin")],
        Annotated[PathModelSource, Tag("path")],
        Annotated[FileModelSource, Tag("file")],
        Annotated[ModelName, Tag("name")],
    ],
    Discriminator(
        _model_source_tag,
        custom_error_type="invalid_model",
        custom_error_message="model must be a model name (the built-in model, a served model, or an uploaded "
        "model's file-... id) or an object with source 'builtin', 'path' or 'file'",
    ),
]


class BuiltinCalibration(BaseModel):
    """The built-in Wikipedia calibration split."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["builtin"] = "builtin"


class TextCalibration(BaseModel):
    """A UTF-8 text file under a model root (paragraphs separated by blank lines)."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["text"]
    path: PathStr


class ActivationsCalibration(BaseModel):
    """An ``activations.npz`` from ``metal-marlin collect`` under a model root."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["activations"]
    path: PathStr


class FileCalibration(BaseModel):
    """An uploaded calibration file (purpose ``calibration``): UTF-8 text or an ``activations.npz``,
    told apart by content when it was uploaded."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["file"]
    file_id: FileIdStr


CalibrationSource = Annotated[
    Union[BuiltinCalibration, TextCalibration, ActivationsCalibration, FileCalibration], Field(discriminator="source")
]


ExportFormat = Literal["mlx", "autoawq"]
assert set(ExportFormat.__args__) == set(EXPORT_FORMATS)  # type: ignore[attr-defined]


class QuantizationJobCreate(BaseModel):
    """``POST /v1/quantization/jobs``."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSource = Field(
        default_factory=BuiltinModelSource,
        description="The model to quantize: a name (string) or a source object. A name is stored as the object "
        "it stands for (the built-in model, the path of a served model under the model roots, or the upload).",
    )
    calibration: CalibrationSource = Field(default_factory=BuiltinCalibration)
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[32, 64, 128, 256] | None = Field(
        None,
        description="Quantization group size. Default: the largest of 128, 64, 32 that divides every "
        "linear layer's input width (64 for the built-in model).",
    )
    salient_ratio: float = Field(
        0.01, ge=0.0, lt=0.5,
        description="Fraction of input channels kept in fp16. Default 0.01, or 0 with export_format `autoawq` (which requires 0).",
    )
    activation_method: Literal["mean", "max", "rms"] = "rms"
    n_samples: int = Field(DEFAULT_N_SAMPLES, ge=1, le=1024, description="Calibration sequences.")
    seq_len: int = Field(DEFAULT_SEQ_LEN, ge=8, le=4096, description="Tokens per calibration sequence.")
    n_grid: int = Field(20, ge=1, le=100, description="Grid points of the scale search.")
    duo_scaling: bool = False
    method: Literal["awq", "awq+round", "rtn"] = Field(
        "awq",
        description="`awq`: per-channel scale search and clipping. `awq+round`: AWQ, then learned rounding of every block "
        "(signed gradient descent on the block's output error; kept only where it beats AWQ): closer to the original, "
        "several times slower. `rtn`: plain round-to-nearest, the baseline.",
    )
    rounding_steps: int = Field(200, ge=1, le=2000, description="Learned-rounding steps per block (method `awq+round`).")
    export_format: ExportFormat = Field(
        "mlx",
        description="`mlx`: the native MLX-layout result. `autoawq`: also an AutoAWQ GEMM export of it, downloaded with "
        "`GET .../result?format=autoawq`; needs bits 4 and salient_ratio 0 (AutoAWQ has no fp16 side channels), else 422.",
    )

    @model_validator(mode="after")
    def _autoawq_defaults_to_no_salient_channels(self) -> QuantizationJobCreate:
        if self.export_format == "autoawq" and "salient_ratio" not in self.model_fields_set:
            self.salient_ratio = 0.0
        return self


class Hyperparameters(BaseModel):
    bits: int
    group_size: int
    salient_ratio: float
    activation_method: str
    n_samples: int
    seq_len: int
    n_grid: int
    duo_scaling: bool
    method: str = "awq"
    rounding_steps: int = 200


class SourceOut(BaseModel):
    source: str
    path: str | None = None
    file_id: str | None = None


class JobProgress(BaseModel):
    stage: str
    block: int
    n_blocks: int
    elapsed_s: float


class JobError(BaseModel):
    code: str
    message: str


class ResultFile(BaseModel):
    filename: str
    bytes: int
    sha256: str | None = Field(default=None, description="SHA-256 of the file, recorded by the worker before the result became visible.")


class QuantizationJob(BaseModel):
    id: str
    object: Literal["quantization.job"] = "quantization.job"
    created_at: int
    started_at: int | None
    finished_at: int | None
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str = Field(description="The built-in model's id, or the model path as submitted.")
    model_source: SourceOut
    calibration: SourceOut
    hyperparameters: Hyperparameters
    progress: JobProgress | None
    cancel_requested: bool
    error: JobError | None
    result_model: str | None = Field(description="Model id to use for completions once the job succeeded.")
    export_format: ExportFormat = Field(description="The export format the job was submitted with.")
    result_formats: list[ExportFormat] = Field(description="Formats `GET .../result?format=` can download (empty until the job succeeded).")
    result_files: list[ResultFile] = Field(description="Files of the native (`mlx`) result.")
    autoawq_result_files: list[ResultFile] = Field(description="Files of the AutoAWQ GEMM export (`format=autoawq`), if any.")
    stats: dict[str, Any] | None


assert set(QuantizationJob.model_fields["status"].annotation.__args__) == set(JOB_STATUSES)  # type: ignore[union-attr]


class QuantizationJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[QuantizationJob]
    has_more: bool


class QuantizationJobEvent(BaseModel):
    id: str
    object: Literal["quantization.job.event"] = "quantization.job.event"
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None


class QuantizationJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[QuantizationJobEvent]
    has_more: bool


class DeletedJob(BaseModel):
    id: str
    object: Literal["quantization.job"] = "quantization.job"
    deleted: bool


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------
FilePurpose = Literal["model", "calibration"]
assert set(FilePurpose.__args__) == set(FILE_PURPOSES)  # type: ignore[attr-defined]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str = Field(description="The client's file name, kept as metadata only")
    purpose: FilePurpose


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class DeletedFile(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------
# Completions (OpenAI shapes). Unknown fields are ignored, as OpenAI-compatible servers do;
# known fields this server cannot honour are refused with a 400.
# ---------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool | None = False


StopParam = Union[Annotated[str, Field(min_length=1)], Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)], None]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=8)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: StopParam = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (as a string) to a bias in [-100, 100]"
    )
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    user: str | None = None
    # Extensions (vLLM names), sent by the openai client through extra_body.
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 disables it")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    ignore_eos: bool | None = False


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: Union[
        str,
        Annotated[list[str], Field(min_length=1, max_length=16)],
        Annotated[list[TokenId], Field(min_length=1)],
        Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=16)],
    ]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: Annotated[str, Field(max_length=0, description="Not supported: only empty or null")] | None = None
    best_of: Literal[1] | None = Field(None, description="Only 1 (or null) is supported")


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"] = Field(description="Only plain text output is supported")


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=0, description="Not supported: only empty or null")] | None = None
    tool_choice: Literal["none", "auto"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


# ---------------------------------------------------------------------------------------
# Health
# ---------------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok", "starting", "unavailable"]
    worker: dict[str, Any] | None = Field(
        default=None,
        description=(
            "When ready: `pid`, `jobs_enabled`, `current_job`, `loaded_models`, `active_requests`, "
            "`device`, `backend`, `device_name`, `restarts`, and `generation`: the loaded models' scheduler "
            "counters added up (as of the last readiness probe, every 2 s): `steps`, `decode_steps`, "
            "`decode_tokens`, `decode_time` (s), `prefill_tokens`, `prefill_time` (s), `finished`, "
            "`cancelled`, `errors`, `cancel_lag_steps_hist` (for each cancelled request, the decode steps "
            "run between its cancellation and the release of its slot, in buckets `0`, `1`, `2`, `>2`) and "
            "`cancel_lag_steps_max`. Otherwise: `restarts` and `last_exit`."
        ),
    )
    workers: list[dict[str, Any]] | None = Field(
        default=None,
        description=(
            "With several workers (`--worker URL`, `MM_WORKERS`): one entry per worker, `url`, `ready`, "
            "`worker_id`, `device`, `device_name`, `free_bytes` (its model memory left), `loaded_models`, "
            "`active_requests`, `current_job`; `status` is `ok` while any of them is ready, and `worker` "
            "then describes the first ready one."
        ),
    )
