"""The sampling fields of generation.proto over real gRPC (demo model): n choices, penalties, logit bias,
min_tokens and prompt logprobs, each against the single-process reference engine."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from procs import RouterHarness

from grokserve.client import AsyncClient, Client
from grokserve.cluster.spec import DEMO_CHECKPOINT
from grokserve.model.engine import ReferenceEngine
from grokserve.model.sampling import SamplingParams
from grokserve.router.settings import EngineLimits

PROMPT = "And God said unto Moses"


@pytest.fixture(scope="module")
def router():
    harness = RouterHarness(DEMO_CHECKPOINT, limits=EngineLimits(kv_cache_mb=4))
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def reference():
    return ReferenceEngine.from_checkpoint(DEMO_CHECKPOINT, "grokserve")


@pytest.mark.parametrize("fields", [
    {"frequency_penalty": 1.2},
    {"presence_penalty": 1.5, "repetition_penalty": 1.3},
    {"logit_bias": {4: 8.0}, "min_tokens": 6},
    {"repetition_penalty": 0.7, "frequency_penalty": -0.4},
])
def test_greedy_with_processing_equals_the_reference_engine(router, reference, fields):
    ids = router.router.tokenizer.encode(PROMPT)
    with Client(router.address, timeout=60) as client:
        answer = client.generate(ids, max_tokens=24, temperature=0.0, **fields)
    params = SamplingParams(max_tokens=24, logit_bias=tuple(fields.pop("logit_bias", {}).items()), **fields)
    want = reference.generate([ids], params)[0].token_ids
    assert list(answer.token_ids) == want


def test_n_choices_over_grpc_unary_and_stream(router):
    with Client(router.address, timeout=60) as client:
        single = client.generate(PROMPT, max_tokens=10, temperature=1.0, seed=21)
        unary = client.generate(PROMPT, max_tokens=10, temperature=1.0, seed=21, n=3)
        streamed: dict[int, list[int]] = {}
        for message in client.generate_stream(PROMPT, max_tokens=10, temperature=1.0, seed=21, n=3):
            streamed.setdefault(message.index, []).extend(message.token_ids)
    assert [c.index for c in unary.choices] == [0, 1, 2]
    assert list(unary.choices[0].token_ids) == list(single.token_ids) == list(unary.token_ids)
    assert {i: list(c.token_ids) for i, c in enumerate(unary.choices)} == streamed
    assert len({tuple(c.token_ids) for c in unary.choices}) > 1


def test_prompt_logprobs_equal_the_reference_log_softmax(router, reference):
    ids = router.router.tokenizer.encode(PROMPT)
    with Client(router.address, timeout=60) as client:
        answer = client.generate(ids, max_tokens=2, temperature=0.0, prompt_logprobs=2)
    assert [e.sampled.token_id for e in answer.prompt_logprobs] == ids[1:]
    want = torch.log_softmax(reference.logits(ids).double(), dim=-1)  # [T, V]
    for position, entry in enumerate(answer.prompt_logprobs):
        assert entry.sampled.logprob == pytest.approx(float(want[position, ids[position + 1]]), abs=2e-3)
        assert [t.token_id for t in entry.top] == torch.topk(want[position], 2).indices.tolist()


def test_prompt_logprobs_survive_chunked_prefill_and_preemption(reference):
    """A tiny step budget splits prompts over steps; a KV pool smaller than two sequences preempts one of them
    (its blocks freed, its prompt recomputed): each prompt's logprobs are still reported once, correctly."""
    harness = RouterHarness(DEMO_CHECKPOINT, limits=EngineLimits(max_step_tokens=5, kv_cache_mb=0.14, block_size=4))
    try:
        encode = harness.router.tokenizer.encode
        prompts = [encode(PROMPT * 3), encode("In the beginning " * 4)]

        async def both():
            async with AsyncClient(harness.address, timeout=60) as client:
                return await asyncio.gather(*(client.generate(ids, max_tokens=30, temperature=0.0, ignore_eos=True,
                                                              prompt_logprobs=0) for ids in prompts))

        answers = asyncio.run(both())
        assert harness.engine.scheduler.preemptions > 0
        for ids, answer in zip(prompts, answers, strict=True):
            want = torch.log_softmax(reference.logits(ids).double(), dim=-1)
            got = [e.sampled.logprob for e in answer.prompt_logprobs]
            assert got == pytest.approx([float(want[i, ids[i + 1]]) for i in range(len(ids) - 1)], abs=2e-3)
    finally:
        harness.close()


@pytest.mark.parametrize("fields,field", [
    ({"n": 17}, "n"), ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"), ({"min_p": 2.0}, "min_p"),
    ({"logit_bias": {99999: 1.0}}, "logit_bias"), ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"prompt_logprobs": 50}, "prompt_logprobs"),
])
def test_invalid_fields_are_invalid_argument_naming_them(router, fields, field):
    with Client(router.address, timeout=30) as client, pytest.raises(grpc.RpcError) as info:
        client.generate(PROMPT, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()
