"""Chat messages → one prompt text, through a Jinja template (the chat endpoint of the HTTP API).

Grok-1 is a base model: xAI published no chat format. grokserve ships DEFAULT_CHAT_TEMPLATE, a plain
transcript ("Human: …" / "Assistant: …", a system message first as it is) whose generation stops at the
next "Human:" line; operators give their own with `--chat-template FILE` (`router.chat_template` in a
cluster spec) and its stop strings with `--chat-stop`. Templates render in Jinja's immutable sandbox and see
`messages` (role, content) and `add_generation_prompt`, as Hugging Face chat templates do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_CHAT_TEMPLATE = r"""
{%- for message in messages %}
{%- if message.role == 'system' %}{{ message.content }}{{ '\n\n' }}
{%- elif message.role == 'user' %}Human: {{ message.content }}{{ '\n\n' }}
{%- elif message.role == 'assistant' %}Assistant: {{ message.content }}{{ '\n\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}Assistant:{% endif %}"""
DEFAULT_CHAT_STOP = ("\nHuman:",)
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The template failed on these messages (→ 400 naming `messages`)."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str = DEFAULT_CHAT_TEMPLATE
    stop: tuple[str, ...] = DEFAULT_CHAT_STOP  # stop strings every chat request gets
    name: str = "default"
    _compiled: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            template = ImmutableSandboxedEnvironment(keep_trailing_newline=True).from_string(self.source)
        except TemplateError as exc:
            raise ValueError(f"chat_template: {self.name} is not a valid Jinja template ({exc})") from None
        object.__setattr__(self, "_compiled", template)

    @classmethod
    def from_file(cls, path: str | Path, stop: tuple[str, ...] = ()) -> ChatTemplate:
        try:
            source = Path(path).read_text()
        except OSError as exc:
            raise ValueError(f"chat_template: cannot read {path} ({exc.strerror})") from None
        return cls(source, stop, str(path))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt)  # type: ignore[attr-defined]
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed on these messages ({exc})") from None
