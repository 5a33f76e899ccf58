"""TLS on the client API, bearer tokens, mutual TLS on dispatch, and fuzzing of both gRPC services."""

from __future__ import annotations

import contextlib

import grpc
import pytest
from certs import CertificateAuthority
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import RouterHarness, WorkerProc

from grokserve.client import Client
from grokserve.model.checkpoint import CheckpointError, read_checkpoint
from grokserve.model.checkpoint.official import load_pickled_tensor
from grokserve.router.assembly import discover_plan
from grokserve.router.settings import EngineLimits
from grokserve.transport.errors import PlacementMismatch
from grokserve.transport.placement import auto_plan
from grokserve.transport.tls import TlsFiles
from grokserve.v1 import generation_pb2 as gen_pb


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    cluster, rogue = CertificateAuthority("cluster"), CertificateAuthority("rogue")
    return {
        "folder": folder,
        "ca": cluster.write(folder),
        "rogue_ca": rogue.write(folder),
        "server": cluster.issue(folder, "router-api", dns=("localhost",), ips=("127.0.0.1",)),
        "worker": cluster.issue(folder, "grokserve-expert", dns=("grokserve-expert",)),
        "router_client": cluster.issue(folder, "router"),
        "rogue_client": rogue.issue(folder, "intruder"),
    }


def test_tls_only_router_rejects_plaintext_clients_and_serves_tls_ones(tiny_grokserve_ckpt, pki, prompts):
    cert, key = pki["server"]
    harness = RouterHarness(tiny_grokserve_ckpt, tls=TlsFiles(str(cert), str(key)))
    try:
        with Client(harness.address, timeout=5) as plain, pytest.raises(grpc.RpcError) as info:
            plain.generate(prompts[0], max_tokens=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with Client(harness.address, timeout=30, credentials=credentials) as secure:
            assert len(secure.generate(prompts[0], max_tokens=2, ignore_eos=True).token_ids) == 2
    finally:
        harness.close()


def test_bearer_tokens_are_required_but_health_stays_open(tiny_grokserve_ckpt, prompts, tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# clients\nalpha-secret\nbeta-secret\n")
    from grokserve.router.auth import load_tokens

    harness = RouterHarness(tiny_grokserve_ckpt, tokens=load_tokens(tokens_file))
    try:
        for token in (None, "wrong", "alpha-secre", "alpha-secretX"):
            with Client(harness.address, timeout=10, token=token) as client, pytest.raises(grpc.RpcError) as info:
                client.generate(prompts[0], max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
        with Client(harness.address, timeout=10, token="wrong") as client, pytest.raises(grpc.RpcError) as info:
            list(client.generate_stream(prompts[0], max_tokens=2))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for token in ("alpha-secret", "beta-secret"):
            with Client(harness.address, timeout=30, token=token) as client:
                assert len(client.generate(prompts[0], max_tokens=2, ignore_eos=True).token_ids) == 2
        with grpc.insecure_channel(harness.address) as channel:  # probes need no token
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        harness.close()


def _mtls_workers(ckpt, pki):
    config = read_checkpoint(ckpt, "grokserve").config
    cert, key = pki["worker"]
    args = ("--dispatch-ca", str(pki["ca"]), "--dispatch-cert", str(cert), "--dispatch-key", str(key))
    procs = [WorkerProc(ckpt, "all", ",".join(map(str, s.experts)), extra=args)
             for s in auto_plan(config, 2).shards]
    return [p.wait_serving() for p in procs]


def test_mutual_tls_worker_accepts_only_routers_with_a_cluster_certificate(tiny_grokserve_ckpt, pki, prompts):
    workers = _mtls_workers(tiny_grokserve_ckpt, pki)
    addresses = [w.address for w in workers]
    config = read_checkpoint(tiny_grokserve_ckpt, "grokserve").config
    try:
        router_cert, router_key = pki["router_client"]
        good = TlsFiles(str(router_cert), str(router_key), str(pki["ca"]), "grokserve-expert")
        harness = RouterHarness(tiny_grokserve_ckpt, addresses, dispatch_tls=good)
        try:
            with Client(harness.address, timeout=30) as client:
                assert len(client.generate(prompts[1], max_tokens=3, ignore_eos=True).token_ids) == 3
        finally:
            harness.close()
        rogue_cert, rogue_key = pki["rogue_client"]
        rogue = TlsFiles(str(rogue_cert), str(rogue_key), str(pki["ca"]), "grokserve-expert")
        with pytest.raises(PlacementMismatch, match="no Info answer"):
            discover_plan(addresses, config, timeout=3, tls=rogue)
        with pytest.raises(PlacementMismatch):
            discover_plan(addresses, config, timeout=3)  # plaintext
    finally:
        for w in workers:
            w.kill()


def test_max_tokens_above_the_router_limit_is_refused(tiny_grokserve_ckpt, prompts):
    harness = RouterHarness(tiny_grokserve_ckpt, limits=EngineLimits(max_tokens_limit=8, kv_cache_mb=4))
    try:
        with Client(harness.address) as client, pytest.raises(grpc.RpcError) as info:
            client.generate(prompts[0], max_tokens=9)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in info.value.details()
    finally:
        harness.close()


# ---- fuzzing -------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_official_pickles_only_ever_raise_checkpoint_error(vectors, data):
    original = (vectors / "ckpt" / "ckpt-0" / data.draw(st.sampled_from(["tensor00001_000", "tensor00005_000"]))
                ).read_bytes()
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    with contextlib.suppress(CheckpointError):
        load_pickled_tensor(bytes(mutated[:cut]), "fuzz")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_fuzzed_messages_to_live_router_and_worker_always_get_a_status(tiny_grokserve_ckpt, prompts):
    config = read_checkpoint(tiny_grokserve_ckpt, "grokserve").config
    worker = WorkerProc(tiny_grokserve_ckpt, "all", "0-7").wait_serving()
    harness = RouterHarness(tiny_grokserve_ckpt, [worker.address])
    identity = lambda b: b  # noqa: E731
    methods = {
        harness.address: ["/grokserve.v1.Generation/Generate", "/grokserve.v1.Generation/Tokenize",
                          "/grokserve.v1.Generation/GetModelInfo"],
        worker.address: ["/grokserve.v1.ExpertService/Forward", "/grokserve.v1.ExpertService/Info"],
    }
    seeds = [gen_pb.GenerateRequest(prompt_token_ids=prompts[1], max_tokens=2).SerializeToString()]
    import torch

    from grokserve.transport import wire

    seeds.append(wire.encode_request_bytes(1, 0, torch.randn(2, config.d_model), torch.tensor([[0, 1], [2, 3]]),
                                           torch.rand(2, 2)))
    rss_before = _rss_mib(worker.proc.pid)

    @settings(max_examples=120, deadline=None)
    @given(seed=st.sampled_from(seeds), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                       max_size=6),
           cut=st.integers(0, 10**6), junk=st.binary(max_size=64), target=st.sampled_from(list(methods)))
    def fuzz(seed, flips, cut, junk, target):
        message = bytearray(seed)
        for position, value in flips:
            message[position % len(message)] = value
        payload = bytes(message[: cut % (len(message) + 1)]) + junk
        with grpc.insecure_channel(target) as channel:
            for method in methods[target]:
                call = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
                try:
                    call(payload, timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, (method, payload[:40])

    try:
        fuzz()
        assert worker.proc.poll() is None  # the worker process survived
        assert _rss_mib(worker.proc.pid) < rss_before + 200  # memory stayed bounded
        with Client(harness.address, timeout=30) as client:  # and a well-formed request still succeeds
            assert len(client.generate(prompts[2], max_tokens=4, ignore_eos=True).token_ids) == 4
        assert harness.engine.is_alive()
    finally:
        harness.close()
        worker.kill()
