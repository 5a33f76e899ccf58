"""The bundled demo model: Grok-1's architecture, its own tokenizer, and it has learned English."""

from __future__ import annotations

import math

import torch

from grokserve.cluster.spec import DEMO_CHECKPOINT
from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.model.engine import ReferenceEngine
from grokserve.model.sampling import SamplingParams


def test_demo_checkpoint_is_small_and_grok_shaped():
    size = sum(p.stat().st_size for p in DEMO_CHECKPOINT.rglob("*") if p.is_file())
    assert size < 20 * 1024 * 1024
    config = GrokserveCheckpoint(DEMO_CHECKPOINT).config
    assert (config.n_experts, config.n_experts_per_token) == (8, 2)
    assert GrokserveCheckpoint(DEMO_CHECKPOINT).tokenizer_path is not None


def test_demo_model_heldout_perplexity_is_far_below_uniform():
    engine = ReferenceEngine.from_checkpoint(DEMO_CHECKPOINT)
    ids = engine.tokenizer.encode((DEMO_CHECKPOINT / "heldout.txt").read_text())[:2048]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, 256):
        chunk = ids[start:start + 257]
        logprobs = torch.log_softmax(engine.logits(chunk[:-1]), dim=-1)
        targets = torch.tensor(chunk[1:])
        nll -= logprobs[torch.arange(len(targets)), targets].sum().item()
        count += len(targets)
    perplexity = math.exp(nll / count)
    assert perplexity < 50, perplexity  # uniform over the vocabulary would be 2048


def test_demo_model_continues_in_english():
    engine = ReferenceEngine.from_checkpoint(DEMO_CHECKPOINT)
    text = engine.generate(["And God said"], SamplingParams(max_tokens=20))[0].text
    words = text.split()
    common = {"the", "and", "of", "unto", "to", "he", "i", "a", "his", "him", "that", "thee", "thy", "my", "in"}
    assert len(words) >= 8 and sum(w.strip(",.;:").lower() in common for w in words) >= 3, text
