"""Prometheus metrics of a router replica: requests, latencies, tokens, batch, KV and expert parallelism.

Names follow vLLM's where a counterpart exists (`vllm:time_to_first_token_seconds` →
`grokserve_time_to_first_token_seconds`), in base units. Labels are bounded: finish reason, gRPC code,
layer, expert, shard — never request ids. Per-(layer, expert) routing counts are accumulated in a numpy
array and exposed by a collector at scrape time, so the hot path adds one bincount per layer.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from grokserve.model.config import GrokConfig

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
DISPATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512,
                    1.0, 2.0, 5.0)
STEP_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
IMBALANCE_WINDOW_STEPS = 64


class _ExpertChoiceCollector:
    """Tokens routed per (layer, expert) by the MoE router, and the per-layer load imbalance over the last N
    steps."""

    def __init__(self, config: GrokConfig):
        self.n_experts = config.n_experts
        self.counts = np.zeros((config.n_layers, config.n_experts), dtype=np.int64)  # since start
        self.window: collections.deque[np.ndarray] = collections.deque(maxlen=IMBALANCE_WINDOW_STEPS)
        self.current = np.zeros_like(self.counts)  # this step
        self.lock = threading.Lock()

    def observe(self, layer: int, expert_ids: torch.Tensor) -> None:
        """expert_ids [N, K] of one MoE layer in this step."""
        ids = expert_ids.numpy() if expert_ids.device.type == "cpu" else expert_ids.cpu().numpy()
        counts = np.bincount(ids.reshape(-1), minlength=self.n_experts)
        self.current[layer] += counts[:self.n_experts]

    def end_step(self) -> None:
        with self.lock:
            self.counts += self.current
            self.window.append(self.current.copy())
        self.current[:] = 0

    def collect(self):
        with self.lock:
            counts = self.counts.copy()
            window = np.sum(self.window, axis=0) if self.window else np.zeros_like(counts)
        routed = CounterMetricFamily("grokserve_routed_tokens", "Token slots routed to each (layer, expert).",
                                     labels=["layer", "expert"])
        for layer in range(counts.shape[0]):
            for expert in range(counts.shape[1]):
                routed.add_metric([str(layer), str(expert)], float(counts[layer, expert]))
        yield routed
        imbalance = GaugeMetricFamily(
            "grokserve_expert_load_imbalance",
            f"max/mean tokens per expert in each layer over the last {IMBALANCE_WINDOW_STEPS} engine steps "
            "(1 = perfectly balanced).", labels=["layer"])
        for layer in range(window.shape[0]):
            mean = window[layer].mean()
            imbalance.add_metric([str(layer)], float(window[layer].max() / mean) if mean > 0 else 1.0)
        yield imbalance


class RouterMetrics:
    def __init__(self, config: GrokConfig, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("grokserve_requests", "Finished requests by finish reason and API (grpc | http).",
                                ["finish_reason", "api"], registry=r)
        self.request_status = Counter("grokserve_request_status",
                                      "Requests by final status (gRPC code names; HTTP answers map to them) and API.",
                                      ["code", "api"], registry=r)
        self.ttft = Histogram("grokserve_time_to_first_token_seconds", "Admission to first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("grokserve_inter_token_latency_seconds", "Time between consecutive generated tokens.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("grokserve_e2e_request_latency_seconds", "Admission to the last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("grokserve_request_queue_time_seconds", "Admission to first scheduling.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("grokserve_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("grokserve_generation_tokens", "Generated tokens.", registry=r)
        self.running = Gauge("grokserve_num_requests_running", "Sequences holding KV blocks.", registry=r)
        self.waiting = Gauge("grokserve_num_requests_waiting", "Sequences in the admission queue.", registry=r)
        self.queue_capacity = Gauge("grokserve_request_queue_capacity", "Bound of the admission queue.", registry=r)
        self.kv_usage = Gauge("grokserve_kv_cache_usage_ratio", "Fraction of KV blocks in use.", registry=r)
        self.preemptions = Counter("grokserve_preemptions", "Sequences preempted for KV memory.", registry=r)
        self.prefix_cache_queries = Counter("grokserve_prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache (admitted sequences).",
                                            registry=r)
        self.prefix_cache_hits = Counter("grokserve_prefix_cache_hits",
                                         "Prompt tokens whose KV came from the prefix cache.", registry=r)
        self.prefix_cache_blocks = Gauge("grokserve_prefix_cache_cached_blocks",
                                         "KV blocks holding a cached prefix that no sequence references "
                                         "(evictable).", registry=r)
        self.step_seconds = Histogram("grokserve_engine_step_seconds",
                                      "Wall time of one engine step: schedule, forward, sample, stream.",
                                      buckets=DISPATCH_BUCKETS, registry=r)
        self.step_tokens = Histogram("grokserve_engine_step_tokens", "Tokens computed per engine step.",
                                     buckets=STEP_TOKEN_BUCKETS, registry=r)
        self.dispatch_layer = Histogram("grokserve_dispatch_layer_round_trip_seconds",
                                        "One MoE layer's all-to-all (all shards) round trip.", ["layer"],
                                        buckets=DISPATCH_BUCKETS, registry=r)
        self.dispatch_shard = Histogram("grokserve_dispatch_round_trip_seconds",
                                        "Round trip of one message to one expert shard, by transport.",
                                        ["shard", "transport"],
                                        buckets=DISPATCH_BUCKETS, registry=r)
        self.bytes_sent = Counter("grokserve_dispatch_sent_bytes", "Bytes sent to each expert shard.", ["shard"],
                                  registry=r)
        self.bytes_received = Counter("grokserve_dispatch_received_bytes", "Bytes received from each expert shard.",
                                      ["shard"], registry=r)
        self.retries = Counter("grokserve_dispatch_retries", "Calls retried on another replica.", ["shard"],
                               registry=r)
        self.failures = Counter("grokserve_dispatch_failures", "Dispatches that failed on every replica.",
                                ["shard"], registry=r)
        self.shard_replicas = Gauge("grokserve_shard_live_replicas", "Replica addresses known for each shard.",
                                    ["shard"], registry=r)
        self.expert_choices = _ExpertChoiceCollector(config)
        r.register(self.expert_choices)
