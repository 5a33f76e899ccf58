"""Where expert replicas are: a named Ray actor each expert replica registers its gRPC address with.

Expert replicas register at start and refresh at every Serve health check; routers poll the fresh entries
and update their dispatcher, so a replica that Serve replaces is found again with no router restart.
"""

from __future__ import annotations

import time

import ray

REGISTRY_NAME = "grokserve-registry"
REGISTRY_NAMESPACE = "grokserve"


@ray.remote(num_cpus=0, max_restarts=-1)
class ShardRegistry:
    def __init__(self) -> None:
        # replica id → (shard, address, node id, pid, last refresh)
        self.entries: dict[str, tuple[str, str, str, int, float]] = {}

    def register(self, shard: str, replica_id: str, address: str, node_id: str, pid: int) -> None:
        self.entries[replica_id] = (shard, address, node_id, pid, time.monotonic())

    def unregister(self, replica_id: str) -> None:
        self.entries.pop(replica_id, None)

    def snapshot(self, ttl_s: float) -> dict[str, list[dict]]:
        """Fresh entries per shard (stale ones, from replicas that stopped refreshing, are dropped)."""
        now = time.monotonic()
        out: dict[str, list[dict]] = {}
        for replica_id, (shard, address, node_id, pid, seen) in list(self.entries.items()):
            if now - seen > ttl_s:
                del self.entries[replica_id]
                continue
            out.setdefault(shard, []).append({"replica_id": replica_id, "address": address, "node_id": node_id,
                                              "pid": pid, "age_s": round(now - seen, 2)})
        for replicas in out.values():
            replicas.sort(key=lambda r: r["replica_id"])
        return out


def get_registry():
    """The cluster's registry actor, created on first use (detached: it outlives any one replica)."""
    return ShardRegistry.options(  # type: ignore[attr-defined]  # added by @ray.remote
        name=REGISTRY_NAME, namespace=REGISTRY_NAMESPACE, get_if_exists=True, lifetime="detached").remote()
