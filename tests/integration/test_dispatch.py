"""Expert-parallel forward over real worker processes equals the single-process reference engine."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grokserve.model.checkpoint import read_checkpoint
from grokserve.model.dense import DenseModel, GrokModel
from grokserve.model.engine import ReferenceEngine
from grokserve.model.sampling import SamplingParams
from grokserve.router.dispatcher import Dispatcher
from grokserve.router.settings import DispatchSettings
from grokserve.transport import wire
from grokserve.transport.errors import ShardUnavailable
from grokserve.transport.loop_thread import LoopThread
from grokserve.transport.placement import PlacementError, PlacementPlan, Shard, auto_plan
from grokserve.v1 import expert_pb2 as pb
from grokserve.v1 import expert_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def loaded(tiny_grokserve_ckpt):
    return read_checkpoint(tiny_grokserve_ckpt, "grokserve")


@pytest.fixture(scope="module")
def reference(loaded):
    return ReferenceEngine.from_loaded(loaded, "float32")


def _layers_arg(shard: Shard) -> str:
    return ",".join(map(str, shard.layers))


def start_plan(spawn_worker, ckpt, plan: PlacementPlan) -> dict[str, list]:
    procs = {s.name: [spawn_worker(ckpt, _layers_arg(s), ",".join(map(str, s.experts))) for _ in range(s.replicas)]
             for s in plan.shards}
    for reps in procs.values():
        for p in reps:
            p.wait_serving()
    return procs


def dispatch_settings(transport: str, deadline_s: float) -> DispatchSettings:
    """"stream" / "unary": gRPC with that call style; "shm": shared memory (workers here share our host)."""
    if transport == "shm":
        return DispatchSettings(deadline_s=deadline_s, transport="shm")
    return DispatchSettings(deadline_s=deadline_s, transport="grpc", grpc_call=transport)


def distributed_engine(loaded, plan, procs, transport="stream", deadline_s=10.0):
    endpoints = {name: [p.address for p in reps] for name, reps in procs.items()}
    loop = LoopThread("test-dispatch")  # the engine's loop, handed to the dispatcher
    dispatcher = Dispatcher(loaded.config, plan, endpoints, torch.float32, loop,
                            dispatch_settings(transport, deadline_s))
    dense = DenseModel(loaded.config, torch.float32, loaded.params)
    return ReferenceEngine(GrokModel(dense, dispatcher), loop=loop.loop), dispatcher


PLACEMENTS = {
    "one-worker-all-experts": lambda c: auto_plan(c, 1),
    "two-workers-four-experts-each": lambda c: auto_plan(c, 2),
    "eight-workers-one-expert-each": lambda c: auto_plan(c, 8),
    "workers-split-by-layer-range": lambda c: auto_plan(c, 2, layer_groups=2),
    "replicated-shards": lambda c: auto_plan(c, 2, replicas=2),
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_distributed_forward_and_greedy_equal_reference(placement, loaded, reference, prompts, spawn_worker,
                                                       tiny_grokserve_ckpt):
    plan = PLACEMENTS[placement](loaded.config)
    procs = start_plan(spawn_worker, tiny_grokserve_ckpt, plan)
    for transport in ("stream", "unary", "shm"):
        engine, dispatcher = distributed_engine(loaded, plan, procs, transport)
        try:
            for p in prompts:
                torch.testing.assert_close(engine.logits(p), reference.logits(p), rtol=1e-5, atol=1e-5)
            params = SamplingParams(max_tokens=8, ignore_eos=True)
            got = [g.token_ids for g in engine.generate(prompts, params)]
            assert got == [g.token_ids for g in reference.generate(prompts, params)]
            kinds = {r["transport"] for reps in dispatcher.replica_states().values() for r in reps}
            assert kinds == {"shm" if transport == "shm" else f"grpc-{transport}"}, kinds
            if any(s.replicas > 1 for s in plan.shards):  # round-robin really used every replica
                served = {r["address"]: r["calls"] for reps in dispatcher.replica_states().values() for r in reps}
                assert all(served.get(p.address, 0) > 0 for reps in procs.values() for p in reps), served
        finally:
            dispatcher.close()
            dispatcher.loop.stop()


def test_each_worker_holds_only_its_shard(loaded, spawn_worker, tiny_grokserve_ckpt):
    c = loaded.config
    worker = spawn_worker(tiny_grokserve_ckpt, "1", "2,5").wait_serving()
    with grpc.insecure_channel(worker.address) as channel:
        info = pb_grpc.ExpertServiceStub(channel).Info(pb.InfoRequest(), timeout=5)
    assert [(s.layer, list(s.expert_ids)) for s in info.shard] == [(1, [2, 5])]
    assert info.resident_bytes == 2 * 3 * c.d_model * c.ffn_size * 4  # two f32 experts of one layer, nothing more
    assert info.model_id == wire.model_id(c)
    int8 = spawn_worker(tiny_grokserve_ckpt, "1", "2,5", extra=("--weights", "int8")).wait_serving()
    with grpc.insecure_channel(int8.address) as channel:
        info8 = pb_grpc.ExpertServiceStub(channel).Info(pb.InfoRequest(), timeout=5)
    scales = 2 * (2 * c.ffn_size + 8 * c.d_model) * 2  # bf16, per output row (gate, up) or 8 per row (down), twice
    assert (info8.weights, info.weights) == ("int8", "dense")
    assert info8.resident_bytes == 2 * 3 * c.d_model * c.ffn_size + 2 * scales  # int8 bytes: 1/4 of f32's


def test_uncovered_placement_is_rejected_naming_the_gap(loaded):
    plan = PlacementPlan(shards=(Shard(name="a", layers=(0, 1), experts=(0, 1, 2, 3)),
                                 Shard(name="b", layers=(0,), experts=(4, 5, 6, 7))))
    with pytest.raises(PlacementError, match=r"uncovered: \(layer 1, expert 4\)"):
        plan.check(loaded.config)


# ---- malformed messages ------------------------------------------------------------------------

def _good_request(c, layer=0, rows=3):
    hidden = torch.randn(rows, c.d_model)
    ids = torch.tensor([[0, 1]] * rows)
    return wire.encode_request(1, layer, hidden, ids, torch.full((rows, 2), 0.4))


def _mutations(c):
    def mutate(**changes):
        req = _good_request(c)
        for key, value in changes.items():
            setattr(req, key, value)
        return req

    bad_gates = _good_request(c)
    bad_gates.gates = wire.tensor_to_bytes(torch.tensor([[float("nan"), 0.1]] * 3))
    foreign = _good_request(c)
    foreign.expert_ids = wire.tensor_to_bytes(torch.tensor([[0, 7]] * 3, dtype=torch.int32))
    return {
        "dtype": mutate(dtype=pb.DTYPE_BFLOAT16),
        "hidden": mutate(hidden=b"\x00" * 17),
        "num_rows": mutate(num_rows=100_000),
        "expert_ids": foreign,
        "layer": mutate(layer=9),
        "gates": bad_gates,
        "empty": pb.ForwardRequest(),
    }


def test_malformed_forward_messages_get_invalid_argument_and_worker_keeps_serving(loaded, spawn_worker,
                                                                                  tiny_grokserve_ckpt):
    c = loaded.config
    worker = spawn_worker(tiny_grokserve_ckpt, "0", "0-3").wait_serving()
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.ExpertServiceStub(channel)
        for field, request in _mutations(c).items():
            with pytest.raises(grpc.RpcError) as info:
                stub.Forward(request, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            expected_field = "dtype" if field == "empty" else field  # an empty message fails its first check
            assert expected_field in info.value.details(), (field, info.value.details())
            ok = stub.Forward(_good_request(c), timeout=5)
            assert ok.num_rows == 3
        # the same over a stream: errors come back in-band and the stream stays open
        answers = list(stub.ForwardStream(iter([*_mutations(c).values(), _good_request(c)]), timeout=10))
        assert [a.HasField("error") for a in answers] == [True] * 7 + [False]
        assert all(a.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for a in answers[:7])


def test_worker_reports_serving_through_grpc_health(spawn_worker, tiny_grokserve_ckpt):
    worker = spawn_worker(tiny_grokserve_ckpt, "0", "0").wait_serving()
    with grpc.insecure_channel(worker.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service="grokserve.v1.ExpertService"), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


# ---- failures ----------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_killed_worker_fails_fast_with_typed_error_naming_the_shard(loaded, spawn_worker, tiny_grokserve_ckpt,
                                                                    prompts, transport):
    plan = auto_plan(loaded.config, 2)
    procs = start_plan(spawn_worker, tiny_grokserve_ckpt, plan)
    engine, dispatcher = distributed_engine(loaded, plan, procs, transport, deadline_s=2.0)
    try:
        engine.logits(prompts[1])  # channels and streams are open
        procs["experts-1"][0].kill()
        start = time.monotonic()
        with pytest.raises(ShardUnavailable, match="experts-1"):
            engine.logits(prompts[2])
        assert time.monotonic() - start < 2.0 + 1.0  # within the deadline (plus slack), never a hang
    finally:
        dispatcher.close()
        dispatcher.loop.stop()


def test_killed_replica_is_bypassed_through_the_other_replica(loaded, reference, spawn_worker, tiny_grokserve_ckpt,
                                                              prompts):
    plan = auto_plan(loaded.config, 2, replicas=2)
    procs = start_plan(spawn_worker, tiny_grokserve_ckpt, plan)
    engine, dispatcher = distributed_engine(loaded, plan, procs, "stream", deadline_s=2.0)
    try:
        engine.logits(prompts[1])
        procs["experts-0"][0].kill()
        for p in prompts:  # every call succeeds, the dead replica is retried around
            np.testing.assert_allclose(engine.logits(p).numpy(), reference.logits(p).numpy(), rtol=1e-5, atol=1e-5)
        assert dispatcher.stats.failures == 0
    finally:
        dispatcher.close()
        dispatcher.loop.stop()
