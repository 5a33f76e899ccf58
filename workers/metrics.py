"""Prometheus metrics of an expert worker: tokens per (layer, expert), compute time, in-flight calls,
rejected messages by field, resident weight bytes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

COMPUTE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512,
                   1.0, 2.0, 5.0)


class WorkerMetrics:
    def __init__(self, shard: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.shard = shard
        self.tokens = Counter("grokserve_worker_tokens", "Token slots computed per (layer, expert).",
                              ["shard", "layer", "expert"], registry=r)
        self.compute = Histogram("grokserve_worker_compute_seconds", "Expert compute time of one Forward message.",
                                 ["shard"], buckets=COMPUTE_BUCKETS, registry=r)
        self.in_flight = Gauge("grokserve_worker_in_flight", "Forward calls being computed.", ["shard"], registry=r)
        self.rejected = Counter("grokserve_worker_rejected", "Messages refused, by the field that was invalid.",
                                ["shard", "reason"], registry=r)
        self.weights = Gauge("grokserve_worker_weights_bytes", "Expert weight bytes resident.", ["shard"], registry=r)
        self.ready = Gauge("grokserve_worker_ready", "1 once the shard's weights are loaded and it serves.", ["shard"],
                           registry=r)
        self.ready.labels(shard).set(0)


def serve_metrics(registry: CollectorRegistry, host: str, port: int, span: int = 1) -> int:
    """Serve /metrics for `registry` on the first free port in [port, port + span); 0 = any free port.

    Several replicas on one node (Ray packs them) each take the next free port of the range, so none
    collide; the Helm chart's PodMonitor scrapes every port of the range.
    """
    from prometheus_client import start_http_server

    last_error: OSError | None = None
    for candidate in ([0] if port == 0 else range(port, port + max(1, span))):
        try:
            server, _thread = start_http_server(candidate, addr=host, registry=registry)
            return server.server_address[1]
        except OSError as exc:
            last_error = exc
    raise OSError(f"no free metrics port in [{port}, {port + span}) on {host}: {last_error}")
