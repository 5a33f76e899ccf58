"""The single-process reference engine: the whole model on one device, `generate()` for a batch of prompts.

Every distributed path (dispatcher, router, cluster) is tested against this; benchmarks use it as baseline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grokserve.model.batch import padded_batch
from grokserve.model.checkpoint import LoadedCheckpoint, read_checkpoint
from grokserve.model.config import GrokConfig
from grokserve.model.dense import DenseModel, ExpertBackend, GrokModel
from grokserve.model.dtypes import torch_dtype
from grokserve.model.experts import LocalExperts
from grokserve.model.kv_cache import ContiguousKVCache
from grokserve.model.sampling import SampledToken, SamplingParams, finish_reason, make_generator, sample
from grokserve.model.text_stream import TextStream
from grokserve.model.tokenizer import Tokenizer


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"  # length | stop | eos
    tokens: list[SampledToken] = field(default_factory=list)


class ReferenceEngine:
    """Generate or score on one device, one whole batch at a time (no scheduler, contiguous KV cache).

    `loop`: the event loop, running in another thread, that the expert backend lives on (a dispatcher's);
    without one the engine runs each step on an event loop of its own, in the calling thread.
    """

    def __init__(self, model: GrokModel, tokenizer: Tokenizer | None = None, prefill_chunk: int | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.model = model
        self.config: GrokConfig = model.config
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.loop = loop
        self._own_loop = asyncio.new_event_loop() if loop is None else None

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, query_valid: torch.Tensor,
             cache: ContiguousKVCache, rows: torch.Tensor) -> torch.Tensor:
        """One forward call over cache rows [B] of right-padded tokens/positions/query_valid [B, T], run to
        completion → hidden [B, T, D] (zeros at padding)."""
        step = self.model.forward(padded_batch(tokens, positions, query_valid, rows), cache)
        if self._own_loop is not None:
            with torch.inference_mode():
                hidden = self._own_loop.run_until_complete(step)
        else:
            assert self.loop is not None
            hidden = asyncio.run_coroutine_threadsafe(_without_grad(step), self.loop).result()
        out = hidden.new_zeros(*tokens.shape, hidden.shape[-1])
        out[query_valid] = hidden  # the batch's flat tokens are the valid slots in row-major order
        return out

    @classmethod
    def from_loaded(cls, ckpt: LoadedCheckpoint, dtype: str = "float32", experts: ExpertBackend | None = None,
                    prefill_chunk: int | None = None, device: str = "cpu", weights: str = "dense") -> ReferenceEngine:
        """`weights`: "dense" (matrices materialised in `dtype`) or "int8" (resident int8, model/int8.py)."""
        dt = torch_dtype(dtype)
        dense = DenseModel(ckpt.config, dt, ckpt.params, device, weights)
        if experts is None:
            everything = {layer: range(ckpt.config.n_experts) for layer in range(ckpt.config.n_layers)}
            experts = LocalExperts(ckpt.config, everything, dt, ckpt.params, device, weights)
        tokenizer = Tokenizer(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
        return cls(GrokModel(dense, experts), tokenizer, prefill_chunk)

    @classmethod
    def from_checkpoint(cls, path: str | Path, fmt: str = "grokserve", dtype: str = "float32",
                        config_file: str | Path | None = None, **kwargs) -> ReferenceEngine:
        return cls.from_loaded(read_checkpoint(path, fmt, config_file), dtype, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.dense.device

    # ---- full-sequence scoring ------------------------------------------------------------------

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-sequence logits f32 [T, V] for one sequence (what `grokserve score` writes)."""
        self._check_ids(token_ids, "tokens")
        tokens = torch.tensor([token_ids], dtype=torch.int64, device=self.device)
        cache = ContiguousKVCache(self.config, 1, len(token_ids), self.model.dense.dtype, self.device)
        hidden = self._prefill(tokens, torch.tensor([len(token_ids)]), cache)
        return self.model.dense.head(hidden)[0]

    # ---- generation -----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]] | list[str],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Generation]:
        """Generate for a batch of prompts (token ids, or text when a tokenizer is loaded)."""
        prompt_ids = [self._encode(p) for p in prompts]
        params = params if params is not None else SamplingParams()
        per_row = params if isinstance(params, list) else [params] * len(prompt_ids)
        for p in per_row:
            p.validate(self.config.vocab_size)
        rows = len(prompt_ids)
        lengths = torch.tensor([len(p) for p in prompt_ids])
        if int(lengths.max()) >= self.config.max_seq_len:
            raise ValueError(f"prompt: {int(lengths.max())} tokens leave no room to generate in the context "
                             f"length {self.config.max_seq_len}")
        max_len = min(max(len(p) + sp.max_tokens for p, sp in zip(prompt_ids, per_row, strict=True)),
                      self.config.max_seq_len)
        cache = ContiguousKVCache(self.config, rows, max_len, self.model.dense.dtype, self.device)
        padded = torch.zeros(rows, int(lengths.max()), dtype=torch.int64)
        for r, ids in enumerate(prompt_ids):
            padded[r, :len(ids)] = torch.tensor(ids)
        hidden = self._prefill(padded.to(self.device), lengths, cache)  # [B, P, D]
        last = hidden[torch.arange(rows), lengths - 1]  # [B, D]
        logits = self.model.dense.head(last)  # [B, V]

        results = [Generation(prompt_ids=ids) for ids in prompt_ids]
        generators = [make_generator(sp.seed) for sp in per_row]
        streams = [TextStream(self.tokenizer.detokenizer(ids) if self.tokenizer else None, sp.stop)
                   for ids, sp in zip(prompt_ids, per_row, strict=True)]
        texts = [""] * rows
        active = list(range(rows))
        positions = lengths.clone()  # next position per row
        while active:
            still = []
            for i, r in enumerate(active):
                sp = per_row[r]
                res = results[r]
                token = sample(logits[i], sp, generators[r], (prompt_ids[r], res.token_ids), self.config.eos_id)
                res.token_ids.append(token.token_id)
                res.tokens.append(token)
                texts[r] += streams[r].push(token.token_id)
                finish = finish_reason(token.token_id, sp, streams[r].stopped, len(res.token_ids),
                                       int(positions[r]) + 1, self.config.eos_id, self.config.max_seq_len)
                if finish:
                    res.finish_reason = finish
                    texts[r] += streams[r].finish()
                else:
                    still.append(r)
            active = still
            if not active:
                break
            step_rows = torch.tensor(active)
            tokens = torch.tensor([[results[r].token_ids[-1]] for r in active], device=self.device)
            pos = positions[step_rows][:, None].to(self.device)  # [B', 1]
            hidden = self.step(tokens, pos, torch.ones_like(tokens, dtype=torch.bool), cache,
                                   step_rows.to(self.device))
            logits = self.model.dense.head(hidden[:, 0])
            positions[step_rows] += 1
        if self.tokenizer is not None:
            for r, res in enumerate(results):
                res.text = texts[r]
        return results

    # ---- helpers --------------------------------------------------------------------------------

    def _prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: ContiguousKVCache) -> torch.Tensor:
        """Right-padded prompts [B, P] in chunks of `prefill_chunk` → hidden [B, P, D]."""
        rows, width = tokens.shape
        chunk = self.prefill_chunk or width
        all_rows = torch.arange(rows, device=self.device)
        outputs = []
        for start in range(0, width, chunk):
            stop = min(start + chunk, width)
            positions = torch.arange(start, stop, device=self.device).expand(rows, -1)  # [B, C]
            query_valid = positions < lengths.to(self.device)[:, None]
            outputs.append(self.step(tokens[:, start:stop], positions, query_valid, cache, all_rows))
        return torch.cat(outputs, dim=1)

    def _encode(self, prompt: list[int] | str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer; this checkpoint has none (send token ids)")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        self._check_ids(ids, "prompt")
        return ids

    def _check_ids(self, ids: list[int], field_name: str) -> None:
        if not ids:
            raise ValueError(f"{field_name}: must not be empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"{field_name}: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) > self.config.max_seq_len:
            raise ValueError(f"{field_name}: {len(ids)} tokens exceed the context length {self.config.max_seq_len}")


async def _without_grad(step: Coroutine[Any, Any, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return await step
