"""Weight mode int8: the release's int8 matrices stay int8 in memory, and W8A16 matmuls compute what the
reference's bf16 dequantise-then-multiply computes (model/int8.py, docs/architecture.md)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from test_model_fidelity import assert_within_bf16_tolerance

from grokserve.cluster.spec import DEMO_CHECKPOINT
from grokserve.model.checkpoint import read_checkpoint
from grokserve.model.engine import ReferenceEngine
from grokserve.model.experts import LocalExperts
from grokserve.model.int8 import INT8PACK_MAX_ROWS, Int8Weight, int8_matmul, uses_kernel
from grokserve.model.sampling import SamplingParams
from grokserve.model.weights import QuantizedTensor


def _weight(out: int, inp: int, groups: int, seed: int = 0) -> tuple[Int8Weight, torch.Tensor]:
    """A random int8 weight and the reference's bf16 weight bf16(q · s), computed in float64 [out, in]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (out, inp), dtype=torch.int8, generator=g)
    s = (torch.rand(out, groups, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    reference = (q.double() * s.double().repeat_interleave(inp // groups, dim=1)).to(torch.bfloat16)
    return Int8Weight.from_quantized(QuantizedTensor(q, s)), reference


@pytest.mark.parametrize("groups", [1, 8])
def test_dequantised_slab_is_the_reference_bf16_weight_bit_for_bit(groups):
    w, reference = _weight(96, 256, groups)
    assert torch.equal(w.dequantize(torch.bfloat16), reference)
    assert torch.equal(w.dequantize(torch.float32, slice(10, 30)), reference[10:30].float())


# (out, in, groups): Grok-1's blocks in miniature (gate/up: 1 group; attention out and expert down: 8 groups),
# a block width the CPU kernel cannot take (86, as the official tiny model's down projection), and odd rows
@pytest.mark.parametrize("shape", [(344, 256, 1), (256, 256, 8), (64, 688, 8), (257, 512, 8)])
def test_w8a16_matmul_matches_float64_for_every_row_count(shape):
    out, inp, groups = shape
    w, reference = _weight(out, inp, groups)
    g = torch.Generator().manual_seed(1)
    for n in (1, 2, 3, 4, 5, 8, 16, 17, 40):
        x = torch.randn(n + 1, inp, generator=g).to(torch.bfloat16)[1:]  # a view one row in: not aligned
        y = int8_matmul(x, w, torch.float32).double()
        xd, wd = x.double(), reference.double()
        exact = xd @ wd.T  # [n, out]
        width = inp // groups
        partials = sum((xd[:, i:i + width] @ wd[:, i:i + width].T).abs() for i in range(0, inp, width))
        # each block's result is rounded to bf16 once (relative 2^-8); the kernel also skips the reference's
        # rounding of each weight to bf16 (relative 2^-9 each); f32 accumulation adds far less than either
        bound = 2 ** -8 * partials + 2 ** -9 * (xd.abs() @ wd.abs().T) + 1e-6
        assert ((y - exact).abs() <= bound).all(), (shape, n, (y - exact).abs().max())


def test_the_cpu_kernel_runs_where_it_is_safe_and_nowhere_else():
    fits, _ = _weight(64, 256, 8)  # block width 32
    odd, _ = _weight(64, 688, 8)  # block width 86
    cpu = torch.device("cpu")
    assert uses_kernel(fits, 1, cpu) and uses_kernel(fits, INT8PACK_MAX_ROWS, cpu)
    assert not uses_kernel(fits, INT8PACK_MAX_ROWS + 1, cpu)
    assert not uses_kernel(odd, 1, cpu)
    assert all(b.data_ptr() % 64 == 0 and b.is_contiguous() for b in fits.blocks)


def test_int8_mode_refuses_a_checkpoint_without_int8_weights(tiny_checkpoint):
    params = dict(tiny_checkpoint.params)
    name = "layers.1.experts.3.w_up"
    params[name] = params[name].dequantize(torch.bfloat16)
    with pytest.raises(ValueError, match=rf"'{name}' is stored as torch.bfloat16"):
        LocalExperts(tiny_checkpoint.config, {1: [3]}, torch.bfloat16, params, weights="int8")


@pytest.fixture(scope="module")
def demo():
    return read_checkpoint(DEMO_CHECKPOINT, "grokserve")


def test_int8_experts_are_resident_at_half_of_bf16_plus_scales(demo):
    c = demo.config
    shard = {layer: list(range(c.n_experts)) for layer in range(c.n_layers)}
    names = [f"layers.{layer}.experts.{e}.{w}" for layer in shard for e in shard[layer] for w in ("w_gate", "w_up",
                                                                                                   "w_down")]
    int8_bytes = sum(demo.params[n].weight.numel() for n in names)
    scale_bytes = sum(demo.params[n].scales.numel() * 2 for n in names)
    bf16 = LocalExperts(c, shard, torch.bfloat16, demo.params)
    int8 = LocalExperts(c, shard, torch.bfloat16, demo.params, weights="int8")
    held = [t for layer in int8.weights.values() for expert in layer for w in expert for t in w.blocks]
    assert {t.dtype for t in held} == {torch.int8} and sum(t.numel() for t in held) == int8_bytes
    # bf16 mode keeps gate/up in bf16 and (on CPU) the down projection in f32: 2 + 2 + 4 bytes per 3 weights
    assert bf16.resident_bytes() == int8_bytes // 3 * (2 + 2 + 4)
    assert int8.resident_bytes() == int8_bytes + 2 * scale_bytes  # scales as stored and one vector per block


def test_demo_model_in_int8_mode_is_within_bf16_tolerance_of_float32(demo):
    f32 = ReferenceEngine.from_loaded(demo, "float32")
    int8 = ReferenceEngine.from_loaded(demo, "bfloat16", weights="int8")
    assert f32.tokenizer is not None
    ids = f32.tokenizer.encode((DEMO_CHECKPOINT / "heldout.txt").read_text())
    pairs = [(int8.logits(chunk).numpy(), f32.logits(chunk).numpy()) for chunk in (ids[:200], ids[200:203])]
    assert_within_bf16_tolerance(pairs)


PROMPTS = ["And God said", "In the beginning", "The devil is", "Love is", "He that"]
DECIDED = 0.1  # float32's top-two logit margin above which int8 must pick the same token (|Δ| mean ≈ 0.014)


def test_demo_model_greedy_continuations_in_int8_mode_follow_float32(demo):
    """Every free-running int8 continuation equals float32's up to float32's first near tie, and along
    float32's continuations int8 picks float32's token at every decided position."""
    f32 = ReferenceEngine.from_loaded(demo, "float32")
    int8 = ReferenceEngine.from_loaded(demo, "bfloat16", weights="int8")
    assert f32.tokenizer is not None
    params = SamplingParams(max_tokens=24)
    agreed = 0
    for prompt, want, got in zip(PROMPTS, f32.generate(PROMPTS, params), int8.generate(PROMPTS, params),
                                 strict=True):
        prompt_ids = f32.tokenizer.encode(prompt)
        ids = prompt_ids + want.token_ids
        ref = f32.logits(ids[:-1]).numpy()[len(prompt_ids) - 1:]  # [24, V] the logits of each chosen token
        top2 = np.sort(ref, axis=-1)[:, -2:]
        decided = top2[:, 1] - top2[:, 0] >= DECIDED
        forced = int8.logits(ids[:-1]).numpy()[len(prompt_ids) - 1:]
        assert (forced.argmax(-1) == ref.argmax(-1))[decided].all(), prompt
        first_tie = int(np.argmin(decided)) if not decided.all() else len(decided)
        assert got.token_ids[:first_tie] == want.token_ids[:first_tie], prompt
        agreed += sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1],
                                                     zip(got.token_ids, want.token_ids, strict=True)))
    assert agreed >= 24  # the property is not vacuous: the prompts share many tokens before any near tie
