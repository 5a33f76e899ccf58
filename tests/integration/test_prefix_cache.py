"""Prefix caching changes no output: two routers of the demo model, cache on and cache off, answer the same
requests token for token over real gRPC — shared prefixes arriving together and one after another, greedy and
seeded sampling, n > 1, preemption under a tiny KV pool, cancellations — and a fuzz of random prompt families.
After every workload no block is referenced, and the cache was actually hit."""

from __future__ import annotations

import asyncio
import random

import pytest
from procs import RouterHarness

from grokserve.client import AsyncClient
from grokserve.cluster.spec import DEMO_CHECKPOINT
from grokserve.router.settings import EngineLimits

PREAMBLE = "In the beginning God created the heaven and the earth. And the earth was without form, and void."


def make_pair(**limits) -> tuple[RouterHarness, RouterHarness]:
    on = RouterHarness(DEMO_CHECKPOINT, limits=EngineLimits(prefix_cache=True, **limits))
    off = RouterHarness(DEMO_CHECKPOINT, limits=EngineLimits(prefix_cache=False, **limits))
    return on, off


@pytest.fixture(scope="module")
def pair():
    on, off = make_pair(kv_cache_mb=2, block_size=4)
    yield on, off
    on.close()
    off.close()


def run(harness: RouterHarness, requests: list[dict], together: bool = True) -> list[list[int]]:
    async def main():
        async with AsyncClient(harness.address, timeout=120) as client:
            async def one(req):
                answer = await client.generate(**req)
                choices = answer.choices or [answer]
                return [list(c.token_ids) for c in choices]
            if together:
                return await asyncio.gather(*(one(r) for r in requests))
            return [await one(r) for r in requests]
    return asyncio.run(main())


def assert_clean(harness: RouterHarness) -> dict:
    load = harness.idle(timeout=10)
    assert load["running"] == 0 and load["waiting"] == 0 and load["referenced_blocks"] == 0
    assert load["free_blocks"] == load["total_blocks"]
    return load


def family(tokenizer, tails: list[str], **sampling) -> list[dict]:
    return [{"prompt": tokenizer.encode(PREAMBLE + tail), "max_tokens": 12, "ignore_eos": True, **sampling}
            for tail in tails]


TAILS = [" And God said", " And the Spirit", " Let there be light", " And God saw", " And the evening",
         " And God called", " And God made", " And it was so"]


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 4}],
                         ids=["greedy", "seeded"])
@pytest.mark.parametrize("together", [True, False], ids=["together", "one-after-another"])
def test_shared_prefix_requests_equal_cache_off(pair, sampling, together):
    on, off = pair
    requests = family(on.router.tokenizer, TAILS, **sampling)
    hits_before = on.engine.scheduler.prefix_stats.hits
    assert run(on, requests, together) == run(off, requests, together)
    assert on.engine.scheduler.prefix_stats.hits > hits_before  # the cache was used
    assert off.engine.scheduler.prefix_stats.hits == 0
    assert_clean(on)
    assert_clean(off)


def test_n_choices_share_the_prompt_and_equal_cache_off(pair):
    on, off = pair
    request = {"prompt": on.router.tokenizer.encode(PREAMBLE), "max_tokens": 10, "temperature": 1.0, "seed": 9,
               "n": 4}
    hits_before = on.engine.scheduler.prefix_stats.hits
    assert run(on, [request]) == run(off, [request])
    assert on.engine.scheduler.prefix_stats.hits - hits_before >= 3 * 4 * (len(request["prompt"]) // 4 - 1)
    assert_clean(on)


def test_preemption_under_a_tiny_pool_equals_cache_off():
    on, off = make_pair(kv_cache_mb=0.2, block_size=4, max_step_tokens=24)
    try:
        requests = family(on.router.tokenizer, TAILS[:6], temperature=0.0)
        for r in requests:
            r["max_tokens"] = 30
        assert run(on, requests) == run(off, requests)
        assert on.engine.scheduler.preemptions > 0 and off.engine.scheduler.preemptions > 0
        assert_clean(on)
    finally:
        on.close()
        off.close()


def test_cancellations_leave_no_block_behind_and_later_answers_are_unchanged(pair):
    on, off = pair
    requests = family(on.router.tokenizer, TAILS[:4], temperature=0.0)

    async def cancel_some(harness):
        async with AsyncClient(harness.address, timeout=60) as client:
            async def partial(req):
                async for _ in client.generate_stream(**{**req, "max_tokens": 200}):
                    return  # leave after the first message: the stream is cancelled
            await asyncio.gather(*(partial(r) for r in requests))

    for harness in (on, off):
        asyncio.run(cancel_some(harness))
        assert_clean(harness)
    assert run(on, requests) == run(off, requests)


def test_fuzz_random_prompt_families_under_a_small_pool(pair):
    on, off = pair
    rng = random.Random(1234)
    vocab = on.router.tokenizer.encode(PREAMBLE * 2)
    for round_ in range(4):
        requests = []
        for _ in range(rng.randint(3, 8)):
            root = rng.choice([vocab[: rng.randint(4, 40)], vocab[5: 5 + rng.randint(4, 30)]])
            tail = [rng.randrange(3, 2048) for _ in range(rng.randint(0, 9))]
            requests.append({"prompt": root + tail, "max_tokens": rng.randint(1, 10), "ignore_eos": True,
                             "temperature": rng.choice([0.0, 0.7]), "seed": rng.randrange(1000)})
        together = bool(round_ % 2)
        assert run(on, requests, together) == run(off, requests, together), f"round {round_}"
    assert_clean(on)
    assert on.engine.scheduler.prefix_stats.hits > 0


def test_with_micro_batch_overlap_the_cache_still_changes_nothing():
    """A step in two halves is two forward calls (in-step sharing is off then): outputs are unchanged too."""
    on, off = make_pair(kv_cache_mb=2, block_size=4, micro_batch_overlap=True)
    try:
        tokenizer = on.router.tokenizer
        requests = [{"prompt": tokenizer.encode(PREAMBLE), "max_tokens": 8, "temperature": 1.0, "seed": 2, "n": 4},
                    *family(tokenizer, TAILS[:4], temperature=0.0)]
        assert run(on, requests) == run(off, requests)
        assert on.engine.scheduler.prefix_stats.hits > 0
        assert_clean(on)
    finally:
        on.close()
        off.close()
