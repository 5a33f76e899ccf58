"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seed, top-n logprobs.

Used by the reference engine and by the router's scheduler, one sequence (one logits row) at a time, so a
request's draws depend only on its own seed and logits, never on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = 0  # top-n logprobs to report per generated token
    ignore_eos: bool = False

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the field for any value a request may not carry."""
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number ≥ 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if self.logprobs < 0 or self.logprobs > 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        for token in self.stop_token_ids:
            if not 0 <= token < vocab_size:
                raise ValueError(f"stop_token_ids: {token} is outside the vocabulary [0, {vocab_size})")


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> SampledToken:
    """logits f32 [V] → one token. Logprobs are of the unfiltered distribution at temperature 1."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [V]
    if params.temperature == 0.0:
        token = int(torch.argmax(logits))
    else:
        scaled = logits / params.temperature
        if params.top_k > 0 and params.top_k < scaled.numel():
            kth = torch.topk(scaled, params.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
            scaled = scaled.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), -math.inf)
        probs = torch.softmax(scaled, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    top: list[tuple[int, float]] = []
    if params.logprobs:
        values, ids = torch.topk(logprobs, params.logprobs)
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return SampledToken(token, float(logprobs[token]), top)


def finish_reason(token_id: int, params: SamplingParams, stopped_by_text: bool, generated: int,
                  total_tokens: int, eos_id: int, max_seq_len: int) -> str | None:
    """Why a sequence ends after sampling `token_id` (stop | eos | length), or None to go on."""
    if stopped_by_text or token_id in params.stop_token_ids:
        return "stop"
    if token_id == eos_id and not params.ignore_eos:
        return "eos"
    if generated >= params.max_tokens or total_tokens >= max_seq_len:
        return "length"
    return None
