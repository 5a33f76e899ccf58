"""The Generation service over real gRPC: router + expert workers on loopback, tiny official model."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from procs import RouterHarness

from grokserve.client import AsyncClient, Client
from grokserve.model.checkpoint import read_checkpoint
from grokserve.model.engine import ReferenceEngine
from grokserve.model.sampling import SamplingParams
from grokserve.router.settings import EngineLimits
from grokserve.transport.placement import auto_plan
from grokserve.v1 import generation_pb2 as gen_pb


@pytest.fixture(scope="module")
def reference(tiny_grokserve_ckpt):
    return ReferenceEngine.from_checkpoint(tiny_grokserve_ckpt, "grokserve")


@pytest.fixture(scope="module")
def workers_module(tiny_grokserve_ckpt):
    from procs import WorkerProc

    procs = [WorkerProc(tiny_grokserve_ckpt, "all", ",".join(map(str, s.experts))) for s in
             auto_plan(read_checkpoint(tiny_grokserve_ckpt, "grokserve").config, 2).shards]
    for p in procs:
        p.wait_serving()
    yield procs
    for p in procs:
        p.kill()


@pytest.fixture(scope="module")
def router(tiny_grokserve_ckpt, workers_module):
    harness = RouterHarness(tiny_grokserve_ckpt, [w.address for w in workers_module])
    yield harness
    harness.close()


def test_concurrent_staggered_requests_equal_reference_run_alone(router, reference, prompts):
    rng = random.Random(0)
    cases = [(p[: rng.randint(1, len(p))], rng.randint(3, 12)) for p in prompts * 4]

    async def one(client, ids, max_tokens, delay):
        await asyncio.sleep(delay)
        return await client.generate(ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def main():
        async with AsyncClient(router.address) as client:
            return await asyncio.gather(*(one(client, ids, n, 0.02 * i) for i, (ids, n) in enumerate(cases)))

    answers = asyncio.run(main())
    for (ids, n), answer in zip(cases, answers, strict=True):
        expected = reference.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
        assert list(answer.token_ids) == expected
        assert answer.finish_reason == gen_pb.FINISH_REASON_LENGTH
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids), n)


def test_micro_batch_overlap_gives_the_same_outputs(tiny_grokserve_ckpt, workers_module, reference, prompts):
    """Two halves of each step interleaved (dispatch of one during attention of the other): same tokens."""
    harness = RouterHarness(tiny_grokserve_ckpt, [w.address for w in workers_module],
                            limits=EngineLimits(kv_cache_mb=4, micro_batch_overlap=True))
    try:
        cases = [(p[: 1 + i % len(p)], 4 + i % 5) for i, p in enumerate(prompts * 4)]

        async def main():
            async with AsyncClient(harness.address) as client:
                return await asyncio.gather(*(client.generate(ids, max_tokens=n, temperature=0.0, ignore_eos=True)
                                              for ids, n in cases))

        answers = asyncio.run(main())
        for (ids, n), answer in zip(cases, answers, strict=True):
            expected = reference.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
            assert list(answer.token_ids) == expected
        # batches really formed: some decode step advanced two or more sequences together
        assert max(step.decode_sequences for step in harness.engine.recent_steps) >= 2
    finally:
        harness.close()


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(router, prompts):
    kwargs = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    with Client(router.address) as client:
        alone = list(client.generate(prompts[1], **kwargs).token_ids)

    async def crowded():
        async with AsyncClient(router.address) as client:
            noise = [client.generate(prompts[2], max_tokens=12, temperature=1.0, ignore_eos=True) for _ in range(6)]
            results = await asyncio.gather(client.generate(prompts[1], **kwargs), *noise)
            return list(results[0].token_ids)

    assert asyncio.run(crowded()) == alone


def test_stream_delivers_tokens_incrementally_and_finishes_with_usage(router, prompts):
    with Client(router.address) as client:
        chunks = list(client.generate_stream(prompts[0], max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2))
    assert len(chunks) == 5
    assert all(len(c.token_ids) == 1 and len(c.logprobs) == 1 and len(c.logprobs[0].top) == 2 for c in chunks)
    assert [c.finish_reason for c in chunks[:-1]] == [gen_pb.FINISH_REASON_UNSPECIFIED] * 4
    last = chunks[-1]
    assert last.finish_reason == gen_pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == 5
    assert 0 < last.timings.time_to_first_token_seconds <= last.timings.total_seconds


def test_256_concurrent_streams_complete_and_free_every_block(router, prompts):
    before = router.idle()

    async def main():
        async with AsyncClient(router.address, timeout=120) as client:
            async def one(i):
                n = 0
                async for _chunk in client.generate_stream(prompts[i % 3], max_tokens=4 + i % 5, temperature=0.0,
                                                           ignore_eos=True):
                    n += 1
                return n
            return await asyncio.gather(*(one(i) for i in range(256)))

    counts = asyncio.run(main())
    assert counts == [4 + i % 5 for i in range(256)]
    after = router.idle()
    assert after["free_blocks"] == after["total_blocks"] == before["total_blocks"]
    assert not router.engine.scheduler.running and not router.engine.scheduler.waiting


def _invalid_cases():
    long_stop = "x" * 500
    return {
        "prompt": gen_pb.GenerateRequest(),
        "prompt_token_ids": gen_pb.GenerateRequest(prompt_token_ids=[1, 99999]),
        "max_tokens": gen_pb.GenerateRequest(prompt_token_ids=[5], max_tokens=0),
        "max_tokens ": gen_pb.GenerateRequest(prompt_token_ids=[5] * 60, max_tokens=10),  # over the context
        "temperature": gen_pb.GenerateRequest(prompt_token_ids=[5], temperature=float("nan")),
        "temperature ": gen_pb.GenerateRequest(prompt_token_ids=[5], temperature=-1),
        "top_p": gen_pb.GenerateRequest(prompt_token_ids=[5], top_p=0.0),
        "top_p ": gen_pb.GenerateRequest(prompt_token_ids=[5], top_p=1.5),
        "top_k": gen_pb.GenerateRequest(prompt_token_ids=[5], top_k=-3),
        "stop": gen_pb.GenerateRequest(prompt_token_ids=[5], stop=["a"] * 20),
        "stop ": gen_pb.GenerateRequest(prompt_token_ids=[5], stop=[long_stop]),
        "stop_token_ids": gen_pb.GenerateRequest(prompt_token_ids=[5], stop_token_ids=[100000]),
        "logprobs": gen_pb.GenerateRequest(prompt_token_ids=[5], logprobs=500),
        "request": gen_pb.GenerateRequest(prompt_token_ids=[5] * 70000),  # oversized message
    }


@pytest.mark.parametrize("field", list(_invalid_cases()))
def test_invalid_fields_get_invalid_argument_naming_the_field(router, field):
    with Client(router.address) as client, pytest.raises(grpc.RpcError) as info:
        client.stub.Generate(_invalid_cases()[field], timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field.strip()) or f"{field.strip()}:" in info.value.details()


def test_text_prompt_without_tokenizer_is_failed_precondition(router):
    with Client(router.address) as client, pytest.raises(grpc.RpcError) as info:
        client.generate("hello", max_tokens=2)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "tokenizer" in info.value.details()


def test_client_deadline_gives_deadline_exceeded_and_frees_resources(router, prompts):
    with Client(router.address) as client, pytest.raises(grpc.RpcError) as info:
        for _ in client.generate_stream(prompts[2], max_tokens=30, ignore_eos=True, timeout=0.05):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    load = router.idle()
    assert load["running"] == 0 and load["free_blocks"] == load["total_blocks"]


def test_cancel_mid_stream_removes_the_sequence_within_a_step(router, prompts):
    with Client(router.address) as client:
        stream = client.stub.GenerateStream(
            gen_pb.GenerateRequest(prompt_token_ids=prompts[1], max_tokens=50, ignore_eos=True), timeout=30)
        next(stream)
        stream.cancel()
    load = router.idle(timeout=2.0)
    assert load["running"] == 0 and load["free_blocks"] == load["total_blocks"]


def test_queue_full_is_resource_exhausted(tiny_grokserve_ckpt, prompts):
    harness = RouterHarness(tiny_grokserve_ckpt, limits=EngineLimits(max_queue=2, max_running=1,
                                                                     kv_cache_mb=4))
    try:
        async def main():
            async with AsyncClient(harness.address) as client:
                calls = [client.generate(prompts[2], max_tokens=20, ignore_eos=True) for _ in range(12)]
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(main())
        codes = {r.code() for r in results if isinstance(r, grpc.RpcError)}
        assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert any(not isinstance(r, Exception) for r in results)
        assert "queue" in next(r for r in results if isinstance(r, grpc.RpcError)).details()
    finally:
        harness.close()


def test_small_kv_cache_preempts_and_still_matches_reference(tiny_grokserve_ckpt, reference, prompts):
    """A cache far smaller than the batch's needs: sequences are preempted and recomputed, none deadlocks."""
    harness = RouterHarness(tiny_grokserve_ckpt, limits=EngineLimits(kv_cache_mb=1 / 16, block_size=4))
    try:
        # 15 blocks of 4 tokens: six short prompts are all admitted (2 blocks each), then their decodes outgrow
        # the pool (8 blocks each at the end), so younger sequences must be preempted and recomputed.
        assert harness.engine.capacity_tokens == 60

        async def main():
            async with AsyncClient(harness.address, timeout=60) as client:
                return await asyncio.gather(*(client.generate(prompts[1], max_tokens=24, temperature=0.0,
                                                              ignore_eos=True) for _ in range(6)))

        answers = asyncio.run(main())
        assert harness.engine.scheduler.preemptions > 0  # the cache really was too small: sequences were preempted
        expected = reference.generate([prompts[1]], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids
        assert all(list(a.token_ids) == expected for a in answers)
        load = harness.idle()
        assert load["free_blocks"] == load["total_blocks"]
    finally:
        harness.close()


def test_dead_shard_gives_unavailable_and_router_serves_again_when_it_returns(tiny_grokserve_ckpt, prompts,
                                                                               spawn_worker):
    config = read_checkpoint(tiny_grokserve_ckpt, "grokserve").config
    shards = auto_plan(config, 2).shards
    procs = [spawn_worker(tiny_grokserve_ckpt, "all", ",".join(map(str, s.experts))).wait_serving() for s in shards]
    harness = RouterHarness(tiny_grokserve_ckpt, [p.address for p in procs])
    try:
        with Client(harness.address) as client:
            assert len(client.generate(prompts[0], max_tokens=3, ignore_eos=True).token_ids) == 3
            port = procs[1].address.rsplit(":", 1)[1]
            procs[1].kill()
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                client.generate(prompts[0], max_tokens=3, ignore_eos=True, timeout=20)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shard" in info.value.details()
            assert time.monotonic() - start < 10
            spawn_worker(tiny_grokserve_ckpt, "all", ",".join(map(str, shards[1].experts)),
                         extra=("--port", port)).wait_serving()
            deadline = time.monotonic() + 20
            while True:  # the router was never restarted: its channel reconnects to the new worker
                try:
                    assert len(client.generate(prompts[0], max_tokens=3, ignore_eos=True).token_ids) == 3
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
    finally:
        harness.close()


def test_health_and_reflection_are_served(router):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(router.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="grokserve.v1.Generation"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=5)
        names = {s.name for a in answers for s in a.list_services_response.service}
    assert "grokserve.v1.Generation" in names and "grpc.health.v1.Health" in names
