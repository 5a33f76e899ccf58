"""Prometheus metrics over real HTTP scrapes: the numbers match the traffic that was sent."""

from __future__ import annotations

import json
import re

import grpc
import pytest
from procs import RouterHarness, WorkerProc, scrape, total

from grokserve.client import Client
from grokserve.model.checkpoint import read_checkpoint
from grokserve.transport.placement import auto_plan
from grokserve.v1 import generation_pb2 as gen_pb


@pytest.fixture(scope="module")
def system(tiny_grokserve_ckpt):
    config = read_checkpoint(tiny_grokserve_ckpt, "grokserve").config
    workers = []
    for shard in auto_plan(config, 2).shards:
        proc = WorkerProc(tiny_grokserve_ckpt, "all", ",".join(map(str, shard.experts)),
                          extra=("--metrics-port", "0", "--shard-name", shard.name))
        workers.append(proc)
    for proc in workers:
        proc.wait_serving()
    harness = RouterHarness(tiny_grokserve_ckpt, [w.address for w in workers], metrics=True)
    yield harness, workers, config
    harness.close()
    for proc in workers:
        proc.kill()


def _worker_metrics_port(proc: WorkerProc) -> int:
    return int(re.search(r"metrics :(\d+)", proc.serving_line).group(1))


def test_counters_and_histograms_match_the_requests_sent(system, vectors):
    harness, workers, config = system
    prompts = json.loads((vectors / "greedy.json").read_text())["prompts"]
    ok = [(p, 3 + i) for i, p in enumerate(prompts * 2)]
    with Client(harness.address) as client:
        for prompt, n in ok:
            client.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True)
        with pytest.raises(grpc.RpcError):
            client.stub.Generate(gen_pb.GenerateRequest(prompt_token_ids=[5], top_p=2.0), timeout=5)
    harness.idle()
    m = scrape(harness.metrics_port)
    assert total(m, "grokserve_request_status_total", code="OK") == len(ok)
    assert total(m, "grokserve_request_status_total", code="INVALID_ARGUMENT") == 1
    assert total(m, "grokserve_requests_total", finish_reason="length") == len(ok)
    generated = sum(n for _, n in ok)
    assert total(m, "grokserve_generation_tokens_total") == generated
    assert total(m, "grokserve_prompt_tokens_total") == sum(len(p) for p, _ in ok)
    assert total(m, "grokserve_time_to_first_token_seconds_count") == len(ok)
    assert total(m, "grokserve_inter_token_latency_seconds_count") == generated - len(ok)
    assert total(m, "grokserve_e2e_request_latency_seconds_count") == len(ok)
    # the second round of prompts found their leading full blocks cached: the 33-token prompt's 2 blocks of 16
    assert total(m, "grokserve_prefix_cache_queries_total") == sum(len(p) for p, _ in ok)
    hits = total(m, "grokserve_prefix_cache_hits_total")
    assert hits == 2 * 16
    # every token the engine computed went through the MoE of every layer with 2 expert slots
    computed = total(m, "grokserve_engine_step_tokens_sum")
    assert computed == sum(len(p) + n - 1 for p, n in ok) - hits
    for layer in range(config.n_layers):
        assert total(m, "grokserve_routed_tokens_total", layer=layer) == 2 * computed
    # each MoE layer dispatched once per engine step to at least one shard
    steps = total(m, "grokserve_engine_step_tokens_count")
    assert total(m, "grokserve_dispatch_layer_round_trip_seconds_count", layer=0) == steps
    assert total(m, "grokserve_dispatch_sent_bytes_total") > 0
    assert total(m, "grokserve_num_requests_running") == 0 and total(m, "grokserve_kv_cache_usage_ratio") == 0
    # the workers computed exactly the slots the router routed to them
    worker_samples = [scrape(_worker_metrics_port(w)) for w in workers]
    for layer in range(config.n_layers):
        computed_by_workers = sum(total(s, "grokserve_worker_tokens_total", layer=layer) for s in worker_samples)
        assert computed_by_workers == total(m, "grokserve_routed_tokens_total", layer=layer)
    for s in worker_samples:
        assert total(s, "grokserve_worker_ready") == 1
        assert total(s, "grokserve_worker_weights_bytes") == 2 * 4 * 3 * config.d_model * config.ffn_size * 4
        assert total(s, "grokserve_worker_compute_seconds_count") > 0


def test_worker_counts_rejected_messages_by_field(system):
    _, workers, _ = system
    from grokserve.v1 import expert_pb2 as pb
    from grokserve.v1 import expert_pb2_grpc as pb_grpc

    with grpc.insecure_channel(workers[0].address) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.ExpertServiceStub(channel).Forward(pb.ForwardRequest(dtype=pb.DTYPE_FLOAT32, hidden_size=3),
                                                   timeout=5)
    assert total(scrape(_worker_metrics_port(workers[0])), "grokserve_worker_rejected_total",
                 reason="hidden_size") == 1
