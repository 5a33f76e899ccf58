"""The one place a GenerateRequest is checked: every field, with messages that name it.

Produces the prompt token ids and SamplingParams the engine runs, or a RequestError carrying the gRPC
status the service answers with.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import grpc

from grokserve.model.config import GrokConfig
from grokserve.model.sampling import SamplingParams
from grokserve.model.tokenizer import Tokenizer
from grokserve.v1 import generation_pb2 as gen_pb

MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 128
MAX_STOP_TOKEN_IDS = 32
MAX_REQUEST_ID_CHARS = 128
MAX_LOGPROBS = 20
DEFAULT_MAX_TOKENS = 16


class RequestError(ValueError):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def max_prompt_chars(config: GrokConfig) -> int:
    """Text longer than this cannot fit the context at ≥1 char per token: refused before tokenizing."""
    return config.max_seq_len * 64


def request_size_limit(config: GrokConfig) -> int:
    """Largest well-formed GenerateRequest: a full context of token ids or text, stop strings, scalars."""
    return max_prompt_chars(config) * 4 + MAX_STOP_STRINGS * MAX_STOP_STRING_CHARS * 4 + 4096


@dataclass
class ValidRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


def validate_request(req: gen_pb.GenerateRequest, config: GrokConfig, tokenizer: Tokenizer | None,
                     max_tokens_limit: int, capacity_tokens: int) -> ValidRequest:
    size = req.ByteSize()
    if size > request_size_limit(config):
        raise invalid(f"request: {size} bytes exceed the limit of {request_size_limit(config)}")
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid(f"request_id: longer than {MAX_REQUEST_ID_CHARS} characters")
    request_id = req.request_id or uuid.uuid4().hex

    if req.prompt and req.prompt_token_ids:
        raise invalid("prompt, prompt_token_ids: give one of them, not both")
    if req.prompt:
        if tokenizer is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               "prompt: this model has no tokenizer; send prompt_token_ids")
        if len(req.prompt) > max_prompt_chars(config):
            raise invalid(f"prompt: {len(req.prompt)} characters cannot fit the context of {config.max_seq_len} tokens")
        prompt_ids = tokenizer.encode(req.prompt)
        if not prompt_ids:
            raise invalid("prompt: encodes to no tokens")
    else:
        prompt_ids = list(req.prompt_token_ids)
        if not prompt_ids:
            raise invalid("prompt: must not be empty (give prompt or prompt_token_ids)")
        bad = next((t for t in prompt_ids if t >= config.vocab_size), None)
        if bad is not None:
            raise invalid(f"prompt_token_ids: {bad} is outside the vocabulary [0, {config.vocab_size})")

    max_tokens = req.max_tokens if req.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens <= 0:
        raise invalid(f"max_tokens: must be > 0, got {max_tokens}")
    if max_tokens > max_tokens_limit:
        raise invalid(f"max_tokens: {max_tokens} exceeds this router's limit of {max_tokens_limit}")
    total = len(prompt_ids) + max_tokens
    if total > config.max_seq_len:
        raise invalid(f"max_tokens: prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = {total} "
                      f"exceeds the context length {config.max_seq_len}")
    if total > capacity_tokens:
        raise invalid(f"max_tokens: prompt + max_tokens = {total} tokens exceed the KV cache capacity "
                      f"({capacity_tokens} tokens)")

    temperature = req.temperature if req.HasField("temperature") else 1.0
    top_p = req.top_p if req.HasField("top_p") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise invalid(f"temperature: must be a finite number ≥ 0, got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise invalid(f"top_p: must be in (0, 1], got {top_p}")
    if req.top_k < 0:
        raise invalid(f"top_k: must be ≥ 0, got {req.top_k}")
    if len(req.stop) > MAX_STOP_STRINGS:
        raise invalid(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(req.stop)}")
    for s in req.stop:
        if not s or len(s) > MAX_STOP_STRING_CHARS:
            raise invalid(f"stop: each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters")
    if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise invalid(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS}, got {len(req.stop_token_ids)}")
    bad = next((t for t in req.stop_token_ids if t >= config.vocab_size), None)
    if bad is not None:
        raise invalid(f"stop_token_ids: {bad} is outside the vocabulary [0, {config.vocab_size})")
    if req.logprobs > MAX_LOGPROBS:
        raise invalid(f"logprobs: at most {MAX_LOGPROBS}, got {req.logprobs}")
    if req.stop and tokenizer is None:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "stop: stop strings need a tokenizer")

    params = SamplingParams(
        max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p), top_k=req.top_k,
        seed=req.seed if req.HasField("seed") else None, stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids), logprobs=req.logprobs, ignore_eos=req.ignore_eos)
    return ValidRequest(request_id, prompt_ids, params)
