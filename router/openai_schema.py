"""The OpenAI-compatible HTTP API's request bodies (pydantic) and their translation to a GenerateRequest.

Both APIs meet in `generation.proto`'s GenerateRequest: an HTTP request becomes the GenerateRequest a gRPC
client would send for the same thing, so validation, defaults, seeds and answers are the gRPC API's. The
models forbid unknown fields (a misspelt or unsupported option is a 400 naming it, not silently ignored).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from grokserve.router.errors import RequestError
from grokserve.v1 import generation_pb2 as gen_pb

MAX_USER_CHARS = 256
MAX_MESSAGES = 1024


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """The sampling fields both endpoints share (OpenAI's, then the common extensions of vLLM and others)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    top_k: StrictInt = 0  # -1 (vLLM's "off") is accepted as 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None

    def to_proto(self, request_id: str) -> gen_pb.GenerateRequest:
        """The GenerateRequest of these fields (the prompt and logprobs are set by the endpoint)."""
        req = gen_pb.GenerateRequest(request_id=request_id)
        if self.max_tokens is not None:
            if self.max_tokens < 1 or self.max_tokens > 2**31 - 1:
                raise RequestError("max_tokens", f"must be ≥ 1, got {self.max_tokens}")
            req.max_tokens = self.max_tokens
        if self.temperature is not None:
            req.temperature = self.temperature
        if self.top_p is not None:
            req.top_p = self.top_p
        if not 1 <= self.n <= 2**31:
            raise RequestError("n", f"must be ≥ 1, got {self.n}")
        req.n = self.n
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options", "only allowed with stream: true")
        req.stop.extend([self.stop] if isinstance(self.stop, str) else (self.stop or []))
        if self.seed is not None:
            req.seed = self.seed % 2**64  # OpenAI seeds are signed: the same seed always maps to the same draw
        req.presence_penalty, req.frequency_penalty, req.min_p = (self.presence_penalty, self.frequency_penalty,
                                                                  self.min_p)
        for key, bias in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                raise RequestError("logit_bias", f"keys are token ids, got {key!r}") from None
            if not 0 <= token < 2**32:
                raise RequestError("logit_bias", f"token {token} is outside the vocabulary")
            req.logit_bias[token] = bias
        if self.top_k < -1:
            raise RequestError("top_k", f"must be ≥ 0 (or -1 for off), got {self.top_k}")
        req.top_k = max(self.top_k, 0)
        if self.repetition_penalty is not None:
            req.repetition_penalty = self.repetition_penalty
        if not 0 <= self.min_tokens < 2**32:
            raise RequestError("min_tokens", f"must be ≥ 0, got {self.min_tokens}")
        req.min_tokens = self.min_tokens
        req.ignore_eos = self.ignore_eos
        for token in self.stop_token_ids or []:
            if not 0 <= token < 2**32:
                raise RequestError("stop_token_ids", f"{token} is outside the vocabulary")
            req.stop_token_ids.append(token)
        return req


PromptField = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(SamplingFields):
    prompt: PromptField
    logprobs: StrictInt | None = None  # the top-n alternatives per token (0 … 20)
    echo: StrictBool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise RequestError("prompt", "must not be empty")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None  # OpenAI's newer name for max_tokens
    add_generation_prompt: StrictBool = True


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[StrictInt]
