"""Chat prompts: validate OpenAI-style messages and render the model's Jinja chat template.

Templates come from model files written by third parties, so they run in jinja2's immutable
sandbox (no attribute access to Python internals, no mutation of our objects). The variables
and helpers offered are the ones Hugging Face templates expect: ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``tools``, ``raise_exception`` and
``strftime_now``. A model without a template gets its architecture's turn format when we know
it (:func:`default_chat_template`: Gemma GGUF files often carry none), else plain ChatML, the
format most small instruction-tuned models (SmolLM2, Qwen) use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from metal_marlin.tokenizer import Tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "GEMMA_TEMPLATE",
    "ChatTemplateError",
    "apply_chat_template",
    "default_chat_template",
    "encode_chat",
    "normalize_messages",
    "render_chat_template",
]

ROLES = frozenset({"system", "user", "assistant", "tool"})

#: Used when a model ships no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


#: Gemma's turn format, written here from its published description: ``<bos>``, then per turn
#: ``<start_of_turn>{user|model}\n{text}<end_of_turn>\n``; the assistant's role is ``model``;
#: there is no system role, so system text opens the next user turn (two newlines after it);
#: a tool result is a user turn. The generation prompt opens a model turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + (message['content'] | trim) + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.system if role == 'user' else '') + (message['content'] | trim) + '<end_of_turn>\n' }}"
    "{% if role == 'user' %}{% set ns.system = '' %}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

#: GGUF ``general.architecture`` -> the template of a file that carries none.
_ARCHITECTURE_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


def default_chat_template(architecture: str | None) -> str | None:
    """The chat template of an architecture whose model files may lack one (None: unknown)."""
    return _ARCHITECTURE_TEMPLATES.get(architecture or "")


class ChatTemplateError(ValueError):
    """The template failed to render, or raised on purpose via ``raise_exception``."""


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check OpenAI-style chat messages and return copies templates can concatenate.

    Content may be a string or a list of ``{"type": "text", "text": ...}`` parts; parts are
    joined with newlines because templates do ``'...' + message['content']``. ``developer``
    (OpenAI's newer name for the system role) becomes ``system``. An assistant message may have
    no content when it carries ``tool_calls``. Errors name the offending message index.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ValueError("messages must be a list of {role, content} objects")
    if not messages:
        raise ValueError("messages must contain at least one message")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = msg.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise ValueError(
                f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}"
            )
        content = msg.get("content")
        if content is None:
            if role == "assistant" and msg.get("tool_calls"):
                content = ""
            else:
                raise ValueError(f"messages[{i}].content is required for role {role!r}")
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise ValueError(
                        f"messages[{i}].content[{j}] has type {kind!r}; only 'text' parts are supported"
                    )
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"messages[{i}].content[{j}].text must be a string")
                texts.append(text)
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ValueError(
                f"messages[{i}].content must be a string or a list of text parts, "
                f"got {type(content).__name__}"
            )
        clean = dict(msg)
        clean["role"] = role
        clean["content"] = content
        out.append(clean)
    return out


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    # jinja2's own tojson HTML-escapes <, >, & which would corrupt tool schemas in prompts.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile once per template string; templates are long and rendered per request."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        extensions=["jinja2.ext.loopcontrols"],  # {% break %} / {% continue %} in HF templates
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = "",
    eos_token: str | None = "",
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render ``template`` for already-normalised ``messages``."""
    try:
        return _compile(template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            tools=tools,
            **extra,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc


def apply_chat_template(
    tokenizer: Tokenizer,
    messages: Any,
    add_generation_prompt: bool = True,
    *,
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Prompt text for ``messages`` using the tokenizer's template (ChatML if it has none)."""
    template = tokenizer.chat_template or CHATML_TEMPLATE
    return render_chat_template(
        template,
        normalize_messages(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        tools=tools,
        **extra,
    )


def encode_chat(
    tokenizer: Tokenizer, messages: Any, add_generation_prompt: bool = True, **extra: Any
) -> list[int]:
    """Token ids of the chat prompt, with exactly one BOS when the model wants one.

    Many templates write ``bos_token`` themselves; encoding that text with special tokens on
    would add a second BOS, which degrades output on models that add BOS (Llama 3).
    """
    text = apply_chat_template(tokenizer, messages, add_generation_prompt, **extra)
    bos = tokenizer.bos_token
    starts_with_bos = bool(bos) and tokenizer.add_bos_token and text.startswith(bos)
    return tokenizer.encode(text, add_special_tokens=not starts_with_bos)
