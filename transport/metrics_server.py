"""The `/metrics` HTTP endpoint of a router or worker process (prometheus_client's server on a free port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def serve_metrics(registry: CollectorRegistry, host: str, port: int, span: int = 1) -> int:
    """Serve /metrics for `registry` on the first free port in [port, port + span); 0 = any free port.

    Several replicas on one node (Ray packs them) each take the next free port of the range, so none
    collide; the Helm chart's PodMonitor scrapes every port of the range.
    """
    last_error: OSError | None = None
    for candidate in ([0] if port == 0 else range(port, port + max(1, span))):
        try:
            server, _thread = start_http_server(candidate, addr=host, registry=registry)
            return int(server.server_address[1])
        except OSError as exc:
            last_error = exc
    raise OSError(f"no free metrics port in [{port}, {port + span}) on {host}: {last_error}")
