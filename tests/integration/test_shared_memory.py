"""The same-host shared-memory data plane: exact in every dtype, fails fast when a peer dies, leaves nothing
behind, and hands a segment only to the authenticated caller's token."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from procs import RouterHarness

from grokserve.client import Client
from grokserve.model.checkpoint import read_checkpoint
from grokserve.model.dense import DenseModel, GrokModel
from grokserve.model.engine import ReferenceEngine
from grokserve.model.sampling import SamplingParams
from grokserve.router.dispatcher import Dispatcher
from grokserve.router.settings import DispatchSettings
from grokserve.transport.errors import ShardUnavailable
from grokserve.transport.loop_thread import LoopThread
from grokserve.transport.placement import auto_plan
from grokserve.transport.shm import TOKEN_BYTES, host_id
from grokserve.v1 import expert_pb2 as pb
from grokserve.v1 import expert_pb2_grpc as pb_grpc


def _dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if Path("/dev/shm").is_dir() else set()


def _workers(spawn_worker, ckpt, plan, dtype="float32", weights="dense"):
    return {s.name: [spawn_worker(ckpt, "all", ",".join(map(str, s.experts)),
                                  extra=("--dtype", dtype, "--weights", weights)).wait_serving()
                     for _ in range(s.replicas)]
            for s in plan.shards}


def _engine(loaded, plan, procs, dtype: torch.dtype, transport: str, deadline_s: float = 10.0,
            weights: str = "dense"):
    loop = LoopThread("test-shm")
    endpoints = {name: [p.address for p in reps] for name, reps in procs.items()}
    settings = DispatchSettings(transport="shm" if transport == "shm" else "grpc", deadline_s=deadline_s)
    dispatcher = Dispatcher(loaded.config, plan, endpoints, dtype, loop, settings)
    dense = DenseModel(loaded.config, dtype, loaded.params, weights=weights)
    return ReferenceEngine(GrokModel(dense, dispatcher), loop=loop.loop), dispatcher


@pytest.mark.parametrize(("dtype", "weights"), [("bfloat16", "dense"), ("float32", "dense"), ("bfloat16", "int8")])
def test_distributed_equals_local_in_every_mode(tiny_grokserve_ckpt, spawn_worker, prompts, dtype, weights, request):
    """A token whose two experts sit on different workers is rounded once (f32 partials), as in one process."""
    loaded = read_checkpoint(tiny_grokserve_ckpt, "grokserve")
    plan = auto_plan(loaded.config, 2)
    procs = _workers(spawn_worker, tiny_grokserve_ckpt, plan, dtype, weights)
    # workers run one torch thread (their default); so does the in-process reference here: MKL's f32 sums may be
    # ordered by its thread count (measured on an AMX machine: the int8 down projection's f32 slab differed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    local = ReferenceEngine.from_loaded(loaded, dtype, weights=weights)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = [g.token_ids for g in local.generate(prompts, params)]
    for transport in ("shm", "grpc"):
        engine, dispatcher = _engine(loaded, plan, procs, getattr(torch, dtype), transport, weights=weights)
        try:
            for p in prompts:
                if dtype == "bfloat16":  # one rounding of the two-expert sum, as in one process: the same bits
                    assert torch.equal(engine.logits(p), local.logits(p)), transport
                else:  # f32 matmuls of different row counts may sum in another order: to 1e-5
                    torch.testing.assert_close(engine.logits(p), local.logits(p), rtol=1e-5, atol=1e-5)
            assert [g.token_ids for g in engine.generate(prompts, params)] == expected
            kinds = {r["transport"] for reps in dispatcher.replica_states().values() for r in reps}
            assert kinds == ({"shm"} if transport == "shm" else {"grpc-stream"})
        finally:
            dispatcher.close()
            dispatcher.loop.stop()


def test_a_worker_killed_mid_call_fails_fast_and_leaves_no_segment(tiny_grokserve_ckpt, spawn_worker, prompts):
    before = _dev_shm()
    loaded = read_checkpoint(tiny_grokserve_ckpt, "grokserve")
    plan = auto_plan(loaded.config, 2)
    procs = _workers(spawn_worker, tiny_grokserve_ckpt, plan)
    engine, dispatcher = _engine(loaded, plan, procs, torch.float32, "shm", deadline_s=30.0)
    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                engine.logits(prompts[2])
                outcomes.append((time.monotonic(), "ok"))
            except ShardUnavailable:
                outcomes.append((time.monotonic(), "unavailable"))

    try:
        engine.logits(prompts[1])
        assert {r["transport"] for reps in dispatcher.replica_states().values() for r in reps} == {"shm"}
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        time.sleep(0.5)
        killed = time.monotonic()
        procs[plan.shards[1].name][0].proc.kill()
        deadline = time.monotonic() + 10
        while not [o for t, o in outcomes if t > killed and o == "unavailable"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        thread.join(timeout=10)
        first_failure = min(t for t, o in outcomes if t > killed and o == "unavailable")
        # noticed through the closed socket, not by waiting out the 30 s deadline
        assert first_failure - killed < 1.0, first_failure - killed
        assert not thread.is_alive()
    finally:
        dispatcher.close()
        dispatcher.loop.stop()
    assert _dev_shm() == before  # segments are anonymous memory files: nothing is ever left in /dev/shm


def test_a_router_killed_mid_call_leaves_the_workers_serving_others(tiny_grokserve_ckpt, spawn_worker, prompts):
    loaded = read_checkpoint(tiny_grokserve_ckpt, "grokserve")
    procs = _workers(spawn_worker, tiny_grokserve_ckpt, auto_plan(loaded.config, 2))
    addresses = [p.address for reps in procs.values() for p in reps]
    router = subprocess.Popen([sys.executable, "-m", "grokserve.cluster.cli", "router", "--checkpoint",
                               str(tiny_grokserve_ckpt), "--port", "0", "--http-port", "0", "--workers",
                               ",".join(addresses)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in router.stdout:
            if "SERVING on" in line:
                address = line.split("SERVING on ")[1].split()[0]
                break
        hammer = threading.Thread(target=_hammer, args=(address, prompts[2]), daemon=True)
        hammer.start()
        time.sleep(1.0)
        router.send_signal(signal.SIGKILL)
        router.wait(timeout=10)
    finally:
        if router.poll() is None:
            router.kill()
    harness = RouterHarness(tiny_grokserve_ckpt, addresses)  # another router attaches to the same workers
    try:
        with Client(harness.address) as client:
            for _ in range(5):
                assert len(client.generate(prompts[1], max_tokens=4, ignore_eos=True).token_ids) == 4
        states = harness.router.dispatcher.replica_states()
        assert {r["transport"] for reps in states.values() for r in reps} == {"shm"}
        assert all(p.proc.poll() is None for reps in procs.values() for p in reps)
    finally:
        harness.close()


def _hammer(address: str, prompt: list[int]) -> None:
    try:
        with Client(address, timeout=5) as client:
            while True:
                client.generate(prompt, max_tokens=20, ignore_eos=True)
    except grpc.RpcError:
        return


def test_a_segment_goes_only_to_the_holder_of_its_one_time_token(tiny_grokserve_ckpt, spawn_worker):
    worker = spawn_worker(tiny_grokserve_ckpt, "all", "0-7").wait_serving()
    with grpc.insecure_channel(worker.address) as channel:
        stub = pb_grpc.ExpertServiceStub(channel)
        info = stub.Info(pb.InfoRequest(), timeout=5)
        assert info.shared_memory and info.host_id == host_id()
        with pytest.raises(grpc.RpcError) as refused:  # a router on "another host" is refused, naming why
            stub.AttachSharedMemory(pb.AttachRequest(host_id="elsewhere", slots=2), timeout=5)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "host_id" in refused.value.details()
        offer = stub.AttachSharedMemory(pb.AttachRequest(host_id=host_id(), slots=2), timeout=5)
    assert len(offer.token) == TOKEN_BYTES and offer.slots == 2
    assert _claim(offer.socket, os.urandom(TOKEN_BYTES)) is None  # a guessed token gets nothing
    fd = _claim(offer.socket, offer.token)
    assert fd is not None and os.fstat(fd).st_size == offer.slots * (offer.request_bytes + offer.response_bytes)
    os.close(fd)
    assert _claim(offer.socket, offer.token) is None  # a token works once


def _claim(name: str, token: bytes) -> int | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect("\0" + name)
        conn.sendall(token)
        try:
            data, fds, _, _ = socket.recv_fds(conn, 16, 1)
        except (TimeoutError, ConnectionError):
            return None
        return fds[0] if data and fds else None
