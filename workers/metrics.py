"""Prometheus metrics of an expert worker: tokens per (layer, expert), compute time, in-flight calls,
rejected messages by field, resident weight bytes.

Token counts per (layer, expert) are accumulated with one bincount per call into a numpy array and turned
into samples only when Prometheus scrapes (a collector), as on the router.
"""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

COMPUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512,
                   1.0, 2.0, 5.0)


class _ExpertTokenCollector:
    """`grokserve_worker_tokens_total{shard, layer, expert}` from a [layer, expert] array."""

    def __init__(self, shard: str):
        self.shard = shard
        self.counts: dict[int, np.ndarray] = {}  # layer → [E] token slots computed
        self.lock = threading.Lock()

    def add(self, layer: int, expert_ids: np.ndarray, n_experts: int) -> None:
        """expert_ids [N, K] of one call (-1 = a slot of another worker)."""
        counts = np.bincount(expert_ids[expert_ids >= 0], minlength=n_experts)[:n_experts]
        with self.lock:
            if layer in self.counts:
                self.counts[layer] += counts
            else:
                self.counts[layer] = counts.astype(np.int64)

    def collect(self):
        family = CounterMetricFamily("grokserve_worker_tokens", "Token slots computed per (layer, expert).",
                                     labels=["shard", "layer", "expert"])
        with self.lock:
            snapshot = {layer: counts.copy() for layer, counts in self.counts.items()}
        for layer, counts in sorted(snapshot.items()):
            for expert in np.flatnonzero(counts).tolist():
                family.add_metric([self.shard, str(layer), str(expert)], float(counts[expert]))
        yield family


class WorkerMetrics:
    def __init__(self, shard: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.shard = shard
        self.tokens = _ExpertTokenCollector(shard)
        r.register(self.tokens)
        self.compute = Histogram("grokserve_worker_compute_seconds", "Expert compute time of one Forward message.",
                                 ["shard"], buckets=COMPUTE_BUCKETS, registry=r)
        self.in_flight = Gauge("grokserve_worker_in_flight", "Forward calls being computed.", ["shard"], registry=r)
        self.rejected = Counter("grokserve_worker_rejected", "Messages refused, by the field that was invalid.",
                                ["shard", "reason"], registry=r)
        self.weights = Gauge("grokserve_worker_weights_bytes", "Expert weight bytes resident.", ["shard"], registry=r)
        self.ready = Gauge("grokserve_worker_ready", "1 once the shard's weights are loaded and it serves.", ["shard"],
                           registry=r)
        self.ready.labels(shard).set(0)

    def count_tokens(self, layer: int, expert_ids: np.ndarray, n_experts: int) -> None:
        self.tokens.add(layer, expert_ids, n_experts)
