"""The PyTorch Grok-1 computes what xAI's official code computes (tests/data/grok1-tiny, docs/grok1.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from grokserve.model.engine import ReferenceEngine
from grokserve.model.sampling import SamplingParams

# bf16 mode rounds the dequantised weights to bf16 (the reference's dtype flow on GPU); the official
# vectors were produced on XLA:CPU, which elides that rounding, and on this random model rounding the
# weights alone moves logits by up to 0.36 (docs/grok1.md §3). These bounds state that tolerance, for
# bfloat16 and int8 (W8A16) modes alike: |Δlogit| max and mean per sequence, and argmax agreement over all
# positions of the vectors, where a disagreement is allowed only at a near tie of the reference (its top
# two logits closer than NEAR_TIE; the random model's logits are flat, and 4 of its 41 positions are).
BF16_MAX_ABS = 0.5
BF16_MEAN_ABS = 0.03
BF16_ARGMAX_AGREEMENT = 0.85
NEAR_TIE = 0.05


def assert_within_bf16_tolerance(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """pairs of (logits [T, V], float32 reference [T, V]), one per sequence."""
    agree, flips = [], []
    for k, (got, ref) in enumerate(pairs):
        diff = np.abs(got - ref)
        assert diff.max() < BF16_MAX_ABS and diff.mean() < BF16_MEAN_ABS, (k, diff.max(), diff.mean())
        top2 = np.sort(ref, axis=-1)[:, -2:]
        same = got.argmax(-1) == ref.argmax(-1)
        agree.extend(same)
        flips.extend((top2[:, 1] - top2[:, 0])[~same])
    assert np.mean(agree) >= BF16_ARGMAX_AGREEMENT, np.mean(agree)
    assert all(margin < NEAR_TIE for margin in flips), flips


@pytest.fixture(scope="module")
def logits_npz(vectors):
    return np.load(vectors / "logits.npz")


@pytest.fixture(scope="module")
def greedy(vectors):
    return json.loads((vectors / "greedy.json").read_text())


@pytest.mark.parametrize("k", [0, 1, 2])
def test_official_checkpoint_reproduces_official_float32_logits(tiny_engine, logits_npz, k):
    logits = tiny_engine.logits(logits_npz[f"tokens{k}"].tolist()).numpy()
    assert logits.shape == logits_npz[f"seq{k}"].shape
    np.testing.assert_allclose(logits, logits_npz[f"seq{k}"], atol=2e-4, rtol=0)


def test_greedy_generation_matches_official_float32_continuations(tiny_engine, greedy):
    out = tiny_engine.generate(greedy["prompts"], SamplingParams(max_tokens=10, ignore_eos=True))
    assert [g.token_ids for g in out] == greedy["f32"]


def test_official_checkpoint_loads_bit_exactly(tiny_checkpoint, vectors):
    """Every parameter, dequantised in f32 and put back in the official [in, out] orientation, hashes to the
    digest of xAI's own float parameters (tests/data/grok1-tiny/params.sha256.json)."""
    import hashlib

    from grokserve.model.checkpoint.official import official_to_canonical
    from grokserve.model.weights import materialize

    digests = json.loads((vectors / "params.sha256.json").read_text())
    assert len(digests) == 2 + 12 * tiny_checkpoint.config.n_layers
    for path, ref in digests.items():
        name = official_to_canonical(path)
        if "{expert}" in name:
            experts = [materialize(tiny_checkpoint.params[name.format(expert=e)], torch.float32).t()
                       for e in range(tiny_checkpoint.config.n_experts)]
            official = torch.stack(experts)  # [E, in, out]
        else:
            got = materialize(tiny_checkpoint.params[name], torch.float32)
            official = got if got.dim() == 1 or name == "embed" else got.t()
        array = official.contiguous().numpy()
        assert list(array.shape) == ref["shape"], path
        assert hashlib.sha256(array.tobytes()).hexdigest() == ref["sha256"], path


def test_kv_cache_decoding_equals_full_forward(tiny_engine, logits_npz):
    """Feeding one token at a time through the cache gives the full-sequence logits at every position."""
    from grokserve.model.kv_cache import ContiguousKVCache

    tokens = logits_npz["tokens2"].tolist()
    full = tiny_engine.logits(tokens)
    model = tiny_engine.model
    cache = ContiguousKVCache(model.config, 1, len(tokens), model.dense.dtype)
    rows = []
    for pos, tok in enumerate(tokens):
        h = tiny_engine.step(torch.tensor([[tok]]), torch.tensor([[pos]]), torch.ones(1, 1, dtype=torch.bool),
                             cache, torch.tensor([0]))
        rows.append(model.dense.head(h)[0, 0])
    # Only float32 reassociation separates the two: a [1, D] and a [33, D] matmul take different kernels (on
    # AVX-512 machines the logits, of magnitude up to 4, move by up to ~1.1e-5). A cache bug moves them by O(1).
    torch.testing.assert_close(torch.stack(rows), full, atol=3e-5, rtol=1e-5)


def test_chunked_prefill_equals_full_forward(tiny_checkpoint, tiny_engine, logits_npz):
    chunked = ReferenceEngine.from_loaded(tiny_checkpoint, "float32", prefill_chunk=5)
    tokens = logits_npz["tokens2"].tolist()
    torch.testing.assert_close(chunked.logits(tokens), tiny_engine.logits(tokens), atol=1e-5, rtol=1e-5)


def test_padded_batch_equals_each_sequence_alone(tiny_engine, greedy):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    batch = tiny_engine.generate(greedy["prompts"], params)  # lengths 1, 7, 33 right-padded together
    alone = [tiny_engine.generate([p], params)[0] for p in greedy["prompts"]]
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    for b, a in zip(batch, alone, strict=True):
        np.testing.assert_allclose([t.logprob for t in b.tokens], [t.logprob for t in a.tokens], atol=1e-5)


def test_pad_id_is_masked_as_a_key(tiny_checkpoint, tiny_engine):
    """A pad (id 0) inside a sequence is invisible to other queries, as in the official mask: changing the
    pad's embedding changes nothing at any other position."""
    from grokserve.model.checkpoint import LoadedCheckpoint

    params = dict(tiny_checkpoint.params)
    params["embed"] = params["embed"].clone()
    params["embed"][0] = torch.randn(params["embed"].shape[1])
    changed = ReferenceEngine.from_loaded(LoadedCheckpoint(tiny_checkpoint.config, params, None), "float32")
    tokens = [5, 0, 7, 9]
    a, b = tiny_engine.logits(tokens)[:, 1:], changed.logits(tokens)[:, 1:]  # column 0 is the tied pad row
    torch.testing.assert_close(a[[0, 2, 3]], b[[0, 2, 3]], atol=1e-5, rtol=0)
    assert not torch.allclose(a[1], b[1])  # the pad's own query did change: the test can see a difference


@pytest.mark.parametrize("weights", ["dense", "int8"])
def test_bfloat16_and_int8_modes_stay_within_stated_tolerance_of_float32(tiny_checkpoint, logits_npz, weights):
    engine = ReferenceEngine.from_loaded(tiny_checkpoint, "bfloat16", weights=weights)
    assert engine.model.dense.embedding_multiplier == 78.5  # bf16-rounded, as JAX multiplies
    assert engine.model.dense.output_multiplier == 0.578125
    assert_within_bf16_tolerance([(engine.logits(logits_npz[f"tokens{k}"].tolist()).numpy(), logits_npz[f"seq{k}"])
                                  for k in range(3)])


def test_float32_layers_match_an_independent_float64_restatement(tiny_checkpoint, tiny_engine, logits_npz):
    """The forward of docs/grok1.md restated in float64 numpy (gates un-renormalised, tanh GELU, capped logits)."""
    p = {k: v.double().numpy() if isinstance(v, torch.Tensor) else v.dequantize(torch.float64).numpy()
         for k, v in tiny_checkpoint.params.items()}
    c = tiny_checkpoint.config
    tokens = logits_npz["tokens1"]
    T = len(tokens)

    def rms(x, g):
        return g * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)

    def rope(x):  # [T, H, d]
        d = x.shape[-1]
        inv = 1e4 ** (-np.arange(0, d, 2) / d)
        ph = np.arange(T)[:, None] * inv
        ph = np.concatenate([ph, ph], -1)[:, None, :]
        return x * np.cos(ph) + np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1) * np.sin(ph)

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))

    h = p["embed"][tokens] * c.embedding_multiplier
    mask = np.tril(np.ones((T, T), bool))
    for L in range(c.n_layers):
        x = rms(h, p[f"layers.{L}.attn_norm"])
        q = rope((x @ p[f"layers.{L}.wq"].T).reshape(T, c.n_q_heads, c.head_dim))
        k = rope((x @ p[f"layers.{L}.wk"].T).reshape(T, c.n_kv_heads, c.head_dim))
        v = (x @ p[f"layers.{L}.wv"].T).reshape(T, c.n_kv_heads, c.head_dim)
        out = np.zeros((T, c.n_q_heads, c.head_dim))
        for head in range(c.n_q_heads):
            kv = head // c.q_per_kv
            a = q[:, head] @ k[:, kv].T * c.attn_logit_multiplier
            a = 30 * np.tanh(a / 30)
            a = np.where(mask, a, -1e30)
            a = np.exp(a - a.max(-1, keepdims=True))
            out[:, head] = (a / a.sum(-1, keepdims=True)) @ v[:, kv]
        h = h + rms(out.reshape(T, -1) @ p[f"layers.{L}.wo"].T, p[f"layers.{L}.attn_post_norm"])
        x = rms(h, p[f"layers.{L}.moe_norm"])
        r = x @ p[f"layers.{L}.router"].T
        r = np.exp(r - r.max(-1, keepdims=True))
        r /= r.sum(-1, keepdims=True)
        y = np.zeros_like(x)
        for t in range(T):
            for e in np.argsort(-r[t], kind="stable")[:2]:
                pre = f"layers.{L}.experts.{e}."
                act = gelu(x[t] @ p[pre + "w_gate"].T) * (x[t] @ p[pre + "w_up"].T)
                y[t] += r[t, e] * (act @ p[pre + "w_down"].T)
        h = h + rms(y, p[f"layers.{L}.moe_post_norm"])
    ref = rms(h, p["final_norm"]) @ p["embed"].T * c.output_multiplier
    np.testing.assert_allclose(tiny_engine.logits(tokens.tolist()).double().numpy(), ref, atol=5e-5)
