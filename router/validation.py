"""The one place a GenerateRequest is checked: every field, with messages that name it.

Request-level rules live here (size, request_id, prompt, max_tokens against the context, the KV cache and
the router's limit, API defaults); the sampling fields are checked by `SamplingParams.validate`, the one
validator the reference engine uses too. Produces the prompt token ids and SamplingParams the engine runs,
or raises a typed error (router.errors, model.sampling.ParameterError) that the service maps to a status.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from grokserve.model.config import GrokConfig
from grokserve.model.sampling import MAX_LOGIT_BIAS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams
from grokserve.model.tokenizer import Tokenizer
from grokserve.router.errors import RequestError, UnsupportedRequest
from grokserve.v1 import generation_pb2 as gen_pb

MAX_REQUEST_ID_CHARS = 128
# The API's defaults for unset optional fields (generation.proto documents them).
DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


def max_prompt_chars(config: GrokConfig) -> int:
    """Text longer than this cannot fit the context at ≥1 char per token: refused before tokenizing."""
    return config.max_seq_len * 64


def request_size_limit(config: GrokConfig) -> int:
    """Largest well-formed GenerateRequest: a full context of token ids or text, stop strings, scalars."""
    return (max_prompt_chars(config) * 4 + MAX_STOP_STRINGS * MAX_STOP_STRING_CHARS * 4 + MAX_LOGIT_BIAS * 16
            + 4096)


MAX_N = 16  # choices per request


@dataclass
class ValidRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1

    def choice_params(self, index: int) -> SamplingParams:
        """Choice `index`'s parameters: with a seed, choice i draws from seed + i (so choice 0 is the n = 1 answer)."""
        if index == 0 or self.params.seed is None:
            return self.params
        return dataclasses.replace(self.params, seed=(self.params.seed + index) % 2**64)


def validate_request(req: gen_pb.GenerateRequest, config: GrokConfig, tokenizer: Tokenizer | None,
                     max_tokens_limit: int, capacity_tokens: int) -> ValidRequest:
    size = req.ByteSize()
    if size > request_size_limit(config):
        raise RequestError("request", f"{size} bytes exceed the limit of {request_size_limit(config)}")
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    request_id = req.request_id or uuid.uuid4().hex

    if req.prompt and req.prompt_token_ids:
        raise RequestError("prompt, prompt_token_ids", "give one of them, not both")
    if req.prompt:
        if tokenizer is None:
            raise UnsupportedRequest("prompt", "this model has no tokenizer; send prompt_token_ids")
        if len(req.prompt) > max_prompt_chars(config):
            raise RequestError("prompt", f"{len(req.prompt)} characters cannot fit the context of "
                                         f"{config.max_seq_len} tokens")
        prompt_ids = tokenizer.encode(req.prompt)
        if not prompt_ids:
            raise RequestError("prompt", "encodes to no tokens")
    else:
        prompt_ids = list(req.prompt_token_ids)
        if not prompt_ids:
            raise RequestError("prompt", "must not be empty (give prompt or prompt_token_ids)")
        bad = next((t for t in prompt_ids if t >= config.vocab_size), None)
        if bad is not None:
            raise RequestError("prompt_token_ids", f"{bad} is outside the vocabulary [0, {config.vocab_size})")

    max_tokens = req.max_tokens if req.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens > max_tokens_limit:
        raise RequestError("max_tokens", f"{max_tokens} exceeds this router's limit of {max_tokens_limit}")
    total = len(prompt_ids) + max_tokens
    if max_tokens > 0 and total > config.max_seq_len:
        raise RequestError("max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = "
                                         f"{total} exceeds the context length {config.max_seq_len}")
    if max_tokens > 0 and total > capacity_tokens:
        raise RequestError("max_tokens", f"prompt + max_tokens = {total} tokens exceed the KV cache capacity "
                                         f"({capacity_tokens} tokens)")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(req.temperature if req.HasField("temperature") else DEFAULT_TEMPERATURE),
        top_p=float(req.top_p if req.HasField("top_p") else DEFAULT_TOP_P), top_k=req.top_k,
        seed=req.seed if req.HasField("seed") else None, stop=tuple(req.stop),
        stop_token_ids=tuple(req.stop_token_ids), logprobs=req.logprobs, ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty if req.HasField("repetition_penalty") else 1.0, min_p=req.min_p,
        logit_bias=tuple(sorted(req.logit_bias.items())), min_tokens=req.min_tokens,
        prompt_logprobs=req.prompt_logprobs if req.HasField("prompt_logprobs") else None)
    params.validate(config.vocab_size)
    if params.stop and tokenizer is None:
        raise UnsupportedRequest("stop", "stop strings need a tokenizer")
    n = req.n or 1
    if n > MAX_N:
        raise RequestError("n", f"must be in [1, {MAX_N}], got {n}")
    return ValidRequest(request_id, prompt_ids, params, n)
