"""Next-token sampling: greedy, temperature, top-k, top-p, per-request seed, top-n logprobs.

Used by the reference engine and by the router's scheduler, one sequence (one logits row) at a time, so a
request's draws depend only on its own seed and logits, never on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 128
MAX_STOP_TOKEN_IDS = 32
MAX_LOGPROBS = 20
# Temperatures below this sample greedily: dividing logits by a tiny or subnormal temperature overflows
# float32 to inf and the softmax to NaN, and the distribution is a point mass long before that anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5


class ParameterError(ValueError):
    """A sampling parameter is out of range; `field` names it (→ INVALID_ARGUMENT at the API)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate(self, vocab_size: int) -> None:
        """The one check of every sampling field: raise ParameterError naming the first invalid one."""
        if self.max_tokens <= 0:
            raise ParameterError("max_tokens", f"must be > 0, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ParameterError("temperature", f"must be a finite number ≥ 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ParameterError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ParameterError("top_k", f"must be ≥ 0, got {self.top_k}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ParameterError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ParameterError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ParameterError("stop", f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ParameterError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS}, got {len(self.stop_token_ids)}")
        for token in self.stop_token_ids:
            if not 0 <= token < vocab_size:
                raise ParameterError("stop_token_ids", f"{token} is outside the vocabulary [0, {vocab_size})")


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
    """logits f32 [V] → one token (see `sample_batch`)."""
    return sample_batch(logits[None], [params], [generator])[0]


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]
                 ) -> list[SampledToken]:
    """logits f32 [S, V], one row per sequence → one token each. Logprobs are of the unfiltered distribution at
    temperature 1.

    Vectorised over the rows: one log-softmax, one argmax (greedy rows) and one top-n over [S, V]; only rows
    that sample draw alone, each from its own generator, so a sequence's draws depend on its seed and its
    logits only, never on its batch companions. Safe for every value `validate` accepts: tiny temperatures
    are greedy, huge ones flatten the distribution, and the filters always keep the most likely token.
    """
    logits = logits if logits.dtype == torch.float32 else logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [S, V]
    tokens = logits.argmax(dim=-1).tolist()  # greedy rows keep these
    for row, p in enumerate(params):
        if not p.greedy:
            tokens[row] = _draw(logits[row], p, generators[row])
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    most = max(p.logprobs for p in params)
    top_ids: list[list[int]] = []
    top_values: list[list[float]] = []
    if most:
        values, ids = torch.topk(logprobs, most, dim=-1)
        top_ids, top_values = ids.tolist(), values.tolist()
    return [SampledToken(tokens[row], chosen[row],
                         list(zip(top_ids[row][:p.logprobs], top_values[row][:p.logprobs], strict=True))
                         if p.logprobs else [])
            for row, p in enumerate(params)]


def _draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One draw from logits [V] at the params' temperature, after top-k and top-p."""
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        drop_sorted[0] = False
        scaled = scaled.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # cannot happen for finite logits; never crash on it
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))


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
