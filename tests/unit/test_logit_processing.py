"""Penalties, logit bias, min_tokens and min_p against an independent numpy implementation (a plain loop over
each sequence's tokens, written from OpenAI's and Hugging Face's definitions), on the demo model's logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grokserve.cluster.spec import DEMO_CHECKPOINT
from grokserve.model.engine import ReferenceEngine
from grokserve.model.sampling import SamplingParams, make_generator, process_logits, sample_batch


@pytest.fixture(scope="module")
def demo():
    return ReferenceEngine.from_checkpoint(DEMO_CHECKPOINT, "grokserve")


def numpy_processed(logits: np.ndarray, p: SamplingParams, prompt: list[int], output: list[int], eos: int
                    ) -> np.ndarray:
    """OpenAI: logit_bias added; HF/CTRL: repetition penalty on every token seen (positive ÷, negative ×);
    OpenAI: mu[j] -= c[j]·frequency_penalty + (c[j] > 0)·presence_penalty over the output; min_tokens bans."""
    x = logits.astype(np.float64).copy()
    for token, bias in p.logit_bias:
        x[token] += bias
    seen = set(prompt) | set(output)
    for token in seen:
        if p.repetition_penalty != 1:
            x[token] = x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
    counts: dict[int, int] = {}
    for token in output:
        counts[token] = counts.get(token, 0) + 1
    for token, c in counts.items():
        x[token] -= c * p.frequency_penalty + p.presence_penalty
    if len(output) < p.min_tokens:
        for token in (*p.stop_token_ids, *(() if p.ignore_eos else (eos,))):
            x[token] = -np.inf
    return x


CASES = [
    SamplingParams(presence_penalty=1.5),
    SamplingParams(frequency_penalty=0.7),
    SamplingParams(frequency_penalty=-0.5, presence_penalty=-1.0),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.8, frequency_penalty=0.3, presence_penalty=0.2),
    SamplingParams(logit_bias=((5, 100.0), (17, -100.0), (300, 2.5))),
    SamplingParams(min_tokens=10, stop_token_ids=(7, 9), max_tokens=16),
    SamplingParams(min_tokens=2, ignore_eos=True, logit_bias=((2, 50.0),), repetition_penalty=1.2),
]


def test_processing_equals_the_numpy_reference_on_demo_logits(demo):
    rng = np.random.default_rng(0)
    vocab = demo.config.vocab_size
    prompts = [rng.integers(3, vocab, size=int(rng.integers(2, 30))).tolist() for _ in CASES]
    # outputs with repeats, so that counts > 1 occur
    outputs = [[int(t) for t in rng.choice(rng.integers(3, vocab, size=6), size=int(rng.integers(0, 12)))]
               for _ in CASES]
    outputs[0] = []  # a first step: nothing generated yet
    logits = torch.stack([demo.logits(p + out)[-1] for p, out in zip(prompts, outputs, strict=True)])  # [S, V]
    got = process_logits(logits, CASES, list(zip(prompts, outputs, strict=True)), demo.config.eos_id).numpy()
    for row, (params, prompt, out) in enumerate(zip(CASES, prompts, outputs, strict=True)):
        want = numpy_processed(logits[row].numpy(), params, prompt, out, demo.config.eos_id)
        np.testing.assert_allclose(got[row], want, rtol=1e-6, atol=1e-5, err_msg=str(params))
        assert np.isneginf(got[row]).tolist() == np.isneginf(want).tolist()


def test_rows_without_processing_are_untouched_and_batch_mates_do_not_leak(demo):
    logits = torch.stack([demo.logits([5, 6, 7])[-1], demo.logits([8, 9])[-1]])
    params = [SamplingParams(), SamplingParams(frequency_penalty=2.0, logit_bias=((4, 10.0),))]
    out = process_logits(logits, params, [([5, 6, 7], [11, 11]), ([8, 9], [12])], demo.config.eos_id)
    assert torch.equal(out[0], logits[0])
    alone = process_logits(logits[1:], params[1:], [([8, 9], [12])], demo.config.eos_id)
    assert torch.equal(out[1], alone[0])


def test_greedy_follows_the_processed_logits_and_logprobs_stay_the_models(demo):
    logits = demo.logits([5, 6, 7])[-1][None]  # [1, V]
    top = int(logits.argmax())
    params = SamplingParams(logit_bias=((top, -100.0),), logprobs=2)
    token = sample_batch(logits, [params], [make_generator(0)], [([5, 6, 7], [])], demo.config.eos_id)[0]
    assert token.token_id == int(torch.topk(logits[0], 2).indices[1])  # the banned top yields to the runner-up
    assert math.isclose(token.logprob, float(torch.log_softmax(logits[0], -1)[token.token_id]), rel_tol=1e-6)
    assert token.top_logprobs[0][0] == top  # reported of the model's own distribution


def test_min_tokens_makes_eos_impossible_until_reached(demo):
    logits = torch.zeros(1, demo.config.vocab_size)
    logits[0, demo.config.eos_id] = 50.0  # EOS would always win
    params = SamplingParams(min_tokens=3, max_tokens=8)
    early = sample_batch(logits, [params], [make_generator(0)], [([5], [9, 9])], demo.config.eos_id)[0]
    late = sample_batch(logits, [params], [make_generator(0)], [([5], [9, 9, 9])], demo.config.eos_id)[0]
    assert early.token_id != demo.config.eos_id and late.token_id == demo.config.eos_id


def test_min_p_keeps_only_tokens_near_the_most_likely():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    allowed = {0, 1}  # p ≥ 0.5 · 0.5 = 0.25
    gen = make_generator(1)
    drawn = {sample_batch(logits[None], [SamplingParams(temperature=1.0, min_p=0.5)], [gen])[0].token_id
             for _ in range(300)}
    assert drawn == allowed


@pytest.mark.parametrize("kwargs,field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": ((600, 1.0),)}, "logit_bias"), ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
    ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "logit_bias"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_invalid_processing_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).validate(vocab_size=512)
