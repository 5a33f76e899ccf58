"""Next-token sampling: logit processing (logit bias, repetition / frequency / presence penalties, min_tokens),
then greedy or a draw at a temperature after min-p, top-k and top-p; per-request seed; top-n logprobs.

Used by the reference engine and by the router's engine. Processing is vectorised over the batch (one
scatter per kind over all rows); draws are made one row at a time from each request's own generator, so a
request's draws depend only on its own seed, tokens and logits, never on what else is in the batch.

The order, per row (the same as vLLM's): logit_bias is added; the repetition penalty divides positive and
multiplies negative logits of every token seen in the prompt or the output; the frequency penalty subtracts
`frequency_penalty × count` and the presence penalty `presence_penalty` for every token the output holds;
while fewer than `min_tokens` tokens were generated, the end-of-sequence token (unless `ignore_eos`) and the
stop token ids are impossible. Greedy takes the processed argmax; a draw divides by the temperature, keeps
tokens whose probability is ≥ min_p × the most likely one's, then top-k, then top-p. Reported logprobs are of
the model's own distribution (before processing, at temperature 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 128
MAX_STOP_TOKEN_IDS = 32
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's bound)
MAX_PENALTY = 2.0  # |presence_penalty|, |frequency_penalty| (OpenAI's range)
MAX_REPETITION_PENALTY = 10.0
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 → off
    min_p: float = 0.0  # 0 → off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_tokens: int = 0
    prompt_logprobs: int | None = None  # report each prompt token's logprob and this many alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def penalised(self) -> bool:
        """Needs the sequence's tokens (repetition, frequency or presence penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def processes_logits(self) -> bool:
        return self.penalised or bool(self.logit_bias) or self.min_tokens > 0

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise ParameterError(name, f"must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {value}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise ParameterError("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY}], "
                                                       f"got {self.repetition_penalty}")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise ParameterError("min_p", f"must be in [0, 1], got {self.min_p}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ParameterError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            if not 0 <= token < vocab_size:
                raise ParameterError("logit_bias", f"token {token} is outside the vocabulary [0, {vocab_size})")
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise ParameterError("logit_bias", f"bias of token {token} must be in [-100, 100], got {bias}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ParameterError("min_tokens", f"must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ParameterError("prompt_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}")


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return generator


History = tuple[list[int], list[int]]  # a sequence's (prompt ids, output ids so far)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
           history: History = ([], []), eos_id: int | None = None) -> SampledToken:
    """logits f32 [V] → one token (see `sample_batch`)."""
    return sample_batch(logits[None], [params], [generator], [history], eos_id)[0]


def process_logits(logits: torch.Tensor, params: list[SamplingParams], histories: list[History] | None,
                   eos_id: int | None = None) -> torch.Tensor:
    """logits f32 [S, V] → the processed logits [S, V] (module docstring; `logits` itself when no row asks).
    One index_put per kind over all rows that ask for it: no loop over the vocabulary."""
    rows = [r for r, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    if histories is None:
        histories = [([], [])] * len(params)
    out = logits.clone()
    vocab = out.shape[1]

    def scatter(target: torch.Tensor, pairs: list[tuple[int, int]], values: torch.Tensor | float,
                accumulate: bool) -> None:
        if pairs:
            index = torch.tensor(pairs, dtype=torch.int64).T
            value = values if isinstance(values, torch.Tensor) else torch.full((len(pairs),), values,
                                                                              dtype=target.dtype)
            target.index_put_((index[0], index[1]), value, accumulate=accumulate)

    bias = [(r, t, b) for r in rows for t, b in params[r].logit_bias]
    scatter(out, [(r, t) for r, t, _ in bias], torch.tensor([b for *_, b in bias], dtype=out.dtype), True)
    penalised = [r for r in rows if params[r].penalised]
    if penalised:
        sub = out[penalised]  # [P, V]
        counts = torch.zeros_like(sub)  # [P, V] occurrences in the output
        scatter(counts, [(i, t) for i, r in enumerate(penalised) for t in histories[r][1]], 1.0, True)
        seen = counts > 0
        scatter(seen, [(i, t) for i, r in enumerate(penalised) for t in histories[r][0]], True, False)
        column = lambda name: torch.tensor([getattr(params[r], name) for r in penalised], dtype=out.dtype)[:, None]  # noqa: E731
        repetition = column("repetition_penalty")
        sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
        sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)
        out[penalised] = sub
    banned = [(r, t) for r in rows if len(histories[r][1]) < params[r].min_tokens
              for t in (*params[r].stop_token_ids, *(() if params[r].ignore_eos or eos_id is None else (eos_id,)))]
    scatter(out, [(r, t) for r, t in banned if 0 <= t < vocab], -math.inf, False)
    return out


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                 histories: list[History] | None = None, eos_id: int | None = None) -> list[SampledToken]:
    """logits f32 [S, V], one row per sequence → one token each. `histories` (needed by penalties and
    min_tokens): each row's tokens so far. Logprobs are of the model's distribution at temperature 1.

    Vectorised over the rows: one log-softmax, one argmax (greedy rows) and one top-n over [S, V]; only rows
    that sample draw alone, each from its own generator, so a sequence's draws depend on its seed and its
    logits only, never on its batch companions. Safe for every value `validate` accepts: tiny temperatures
    are greedy, huge ones flatten the distribution, and the filters always keep the most likely token.
    """
    logits = logits if logits.dtype == torch.float32 else logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [S, V]
    processed = process_logits(logits, params, histories, eos_id)  # [S, V]
    tokens = processed.argmax(dim=-1).tolist()  # greedy rows keep these
    for row, p in enumerate(params):
        if not p.greedy:
            tokens[row] = _draw(processed[row], p, generators[row])
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
    if params.min_p > 0:  # p ≥ min_p · p_max  ⇔  logit ≥ max logit + log(min_p)
        scaled = scaled.masked_fill(scaled < scaled.max() + math.log(params.min_p), -math.inf)
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
