"""The Ray Serve application on a simulated multi-node Ray cluster: placement, failures, recovery."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import grpc
import pytest
import ray
from ray import serve

from grokserve.client import Client
from grokserve.cluster.app import REGISTRY_TTL_S
from grokserve.cluster.registry import get_registry
from grokserve.cluster.session import deploy, describe, teardown
from grokserve.cluster.spec import parse_spec
from grokserve.model.engine import ReferenceEngine
from grokserve.model.sampling import SamplingParams

APP = "grokserve-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_grokserve_ckpt):
    spec = parse_spec({
        "name": APP,
        "model": {"checkpoint": str(tiny_grokserve_ckpt)},
        "router": {"grpc_port": _free_port(), "dispatch": {"deadline_s": 2.0},
                   "ray_actor_options": {"num_cpus": 0.5, "resources": {"head": 0.01}}},
        "experts": {"shards": [
            {"name": "a", "experts": "0-3", "ray_actor_options": {"num_cpus": 0.25, "resources": {"node_a": 0.01}}},
            {"name": "b", "experts": "4-7", "replicas": 2,
             "ray_actor_options": {"num_cpus": 0.25, "resources": {"node_b": 0.01}}},
        ]},
    })
    stats = deploy(spec, blocking_timeout=180)
    yield {"spec": spec, "address": f"127.0.0.1:{stats['port']}"}
    teardown(APP)


@pytest.fixture(scope="module")
def reference(tiny_grokserve_ckpt):
    return ReferenceEngine.from_checkpoint(tiny_grokserve_ckpt, "grokserve")


def _shards() -> dict:
    return ray.get(get_registry().snapshot.remote(REGISTRY_TTL_S), timeout=10)


def _router_identity() -> tuple:
    stats = serve.get_deployment_handle("router", app_name=APP).stats.remote().result(timeout_s=10)
    return stats["node_id"], stats["port"]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_shards_land_on_the_requested_nodes_and_a_stream_is_served_end_to_end(app, ray_cluster, reference, prompts):
    nodes = ray_cluster.named_nodes
    shards = _wait_for(lambda: (s := _shards()) and len(s.get("b", [])) == 2 and s.get("a") and s, 60, "replicas")
    assert {r["node_id"] for r in shards["a"]} == {nodes["node_a"].node_id}
    assert {r["node_id"] for r in shards["b"]} == {nodes["node_b"].node_id}
    report = describe(APP)
    assert set(report["deployments"]) == {"router", "expert-a", "expert-b"}
    with Client(app["address"]) as client:
        chunks = list(client.generate_stream(prompts[2], max_tokens=8, temperature=0.0, ignore_eos=True))
    expected = reference.generate([prompts[2]], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    assert [t for c in chunks for t in c.token_ids] == expected
    # every replica shares this host with the router (simulated nodes): dispatch goes through shared memory
    replicas = describe(APP)["router"]["replicas"]
    assert {r["transport"] for reps in replicas.values() for r in reps} == {"shm"}, replicas


class SteadyLoad:
    """Requests one after another from a few threads; records each outcome and latency."""

    def __init__(self, address: str, prompt: list[int], deadline_s: float = 8.0, threads: int = 3):
        self.results: list[tuple[float, float, str]] = []  # (start, seconds, status)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(address, prompt, deadline_s), daemon=True)
                        for _ in range(threads)]

    def _loop(self, address, prompt, deadline_s):
        with Client(address) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    client.generate(prompt, max_tokens=4, temperature=0.0, ignore_eos=True, timeout=deadline_s)
                    status = "OK"
                except grpc.RpcError as exc:
                    status = exc.code().name
                self.results.append((start, time.monotonic() - start, status))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def test_two_replica_shard_loses_no_request_when_a_replica_is_killed(app, prompts):
    victim = _wait_for(lambda: len(_shards().get("b", [])) == 2 and _shards()["b"][0], 60, "two replicas of b")
    router_before = _router_identity()
    with SteadyLoad(app["address"], prompts[1]) as load:
        time.sleep(1.5)
        os.kill(victim["pid"], signal.SIGKILL)
        time.sleep(6)
    statuses = [s for _, _, s in load.results]
    assert statuses and set(statuses) == {"OK"}, statuses
    assert _router_identity() == router_before  # the router never restarted


def test_single_replica_shard_killed_under_load_recovers_without_hangs(app, prompts):
    victim = _wait_for(lambda: _shards().get("a") and _shards()["a"][0], 60, "replica of a")
    router_before = _router_identity()
    with SteadyLoad(app["address"], prompts[1], deadline_s=8.0) as load:
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        new = _wait_for(lambda: [r for r in _shards().get("a", []) if r["pid"] != victim["pid"]], 90,
                        "Serve to restart shard a")
        assert new

        def recovered() -> bool:  # requests after Serve's restart succeed: three in a row
            after = [s for t0, _, s in load.results if t0 > killed_at]
            return len(after) >= 3 and after[-3:] == ["OK"] * 3

        _wait_for(recovered, 90, "three consecutive successes after the restart")
    assert max(seconds for _, seconds, _ in load.results) < 8.0 + 2.0  # nothing hangs past its deadline
    after = [s for t0, _, s in load.results if t0 > killed_at]
    assert set(after) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert _router_identity() == router_before


def test_node_loss_fails_fast_and_service_returns_when_node_is_back(app, ray_cluster, prompts):
    nodes = ray_cluster.named_nodes
    router_before = _router_identity()
    ray_cluster.remove_node(nodes["node_a"])
    try:
        with Client(app["address"]) as client:
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                for _ in range(20):  # until the failure is seen (a request may still be in flight)
                    client.generate(prompts[1], max_tokens=3, ignore_eos=True, timeout=8)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert time.monotonic() - start < 30
    finally:
        nodes["node_a"] = ray_cluster.add_node(num_cpus=2, resources={"node_a": 1})
        ray_cluster.wait_for_nodes()

    def served() -> bool:
        try:
            with Client(app["address"]) as client:
                return len(client.generate(prompts[1], max_tokens=3, ignore_eos=True, timeout=8).token_ids) == 3
        except grpc.RpcError:
            return False

    _wait_for(served, 120, "the shard to be rescheduled on the returning node")
    # the lost replica's registry entry expires (it stopped refreshing); only the new one remains
    _wait_for(lambda: {r["node_id"] for r in _shards().get("a", [])} == {nodes["node_a"].node_id},
              REGISTRY_TTL_S + 10, "the lost replica's entry to expire")
    assert _router_identity() == router_before


def test_demo_model_greedy_continuation_is_the_same_through_the_cluster_as_the_reference(ray_cluster):
    """The default spec (demo model, 2 expert workers) streams the reference engine's text, over gRPC and over
    the OpenAI HTTP API (the official `openai` client, completions and chat, whole and streamed: the same answers
    as gRPC for the same seed)."""
    import openai

    from grokserve.cluster.spec import DEMO_CHECKPOINT

    spec = parse_spec({"name": "grokserve-demo-test", "router": {"grpc_port": _free_port(),
                                                                  "http_port": _free_port(),
                                                                  "ray_actor_options": {"num_cpus": 0.5}},
                       "experts": {"ray_actor_options": {"num_cpus": 0.25}}})
    stats = deploy(spec, blocking_timeout=180)
    try:
        with Client(f"127.0.0.1:{stats['port']}") as client:
            text = "".join(c.text for c in client.generate_stream("And God said", max_tokens=24, temperature=0.0))
            seeded = client.generate("And God said", max_tokens=16, temperature=0.8, seed=7).text
        expected = ReferenceEngine.from_checkpoint(DEMO_CHECKPOINT).generate(
            ["And God said"], SamplingParams(max_tokens=24))[0].text
        assert text == expected and len(text.split()) > 10

        assert stats["http_port"] == spec.router.http_port
        with openai.OpenAI(base_url=f"http://127.0.0.1:{stats['http_port']}/v1", api_key="-", max_retries=0) as api:
            whole = api.completions.create(model="grokserve-demo", prompt="And God said", max_tokens=16,
                                           temperature=0.8, seed=7)
            streamed = "".join(c.choices[0].text for c in api.completions.create(
                model="grokserve-demo", prompt="And God said", max_tokens=16, temperature=0.8, seed=7, stream=True))
            assert whole.choices[0].text == streamed == seeded
            messages = [{"role": "user", "content": "Who made the light?"}]
            chat = api.chat.completions.create(model="grokserve-demo", messages=messages, max_tokens=8, seed=3)
            chat_stream = "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(
                model="grokserve-demo", messages=messages, max_tokens=8, seed=3, stream=True))
            assert chat.choices[0].message.content == chat_stream and chat.usage.completion_tokens > 0
    finally:
        teardown("grokserve-demo-test")
