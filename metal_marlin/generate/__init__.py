"""Text generation pieces that sit around the model: prompts in, tokens picked, text out.

- :mod:`.chat`: message validation and sandboxed Jinja chat templates.
- :mod:`.sampling`: :class:`SamplingParams` (OpenAI ranges) and the batched MLX :class:`Sampler`.
- :mod:`.detokenize`: UTF-8-safe incremental detokenization.
- :mod:`.stopping`: stop strings and the per-sequence :class:`TokenStreamer`.

Importing this package does not import MLX (only running a :class:`Sampler` does), so the
service can validate requests with these classes while the accelerator stays in the worker.
"""

from metal_marlin.generate.chat import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    apply_chat_template,
    encode_chat,
    normalize_messages,
    render_chat_template,
)
from metal_marlin.generate.detokenize import StreamingDetokenizer
from metal_marlin.generate.sampling import (
    MAX_TOP_LOGPROBS,
    SampleOutput,
    Sampler,
    SamplingParams,
    SamplingState,
)
from metal_marlin.generate.stopping import (
    FinishReason,
    StopMatch,
    StopStringMatcher,
    StreamDelta,
    TokenStreamer,
)

__all__ = [
    "CHATML_TEMPLATE",
    "MAX_TOP_LOGPROBS",
    "ChatTemplateError",
    "FinishReason",
    "SampleOutput",
    "Sampler",
    "SamplingParams",
    "SamplingState",
    "StopMatch",
    "StopStringMatcher",
    "StreamDelta",
    "StreamingDetokenizer",
    "TokenStreamer",
    "apply_chat_template",
    "encode_chat",
    "normalize_messages",
    "render_chat_template",
]
