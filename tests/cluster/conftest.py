"""One Ray cluster for the whole test session: a head and two simulated nodes with custom resources."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("ray"))
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"head": 1},
                                                            "include_dashboard": False})
    nodes = {name: cluster.add_node(num_cpus=2, resources={name: 1}) for name in ("node_a", "node_b")}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="grokserve", log_to_driver=False)
    serve.start(proxy_location="Disabled")
    cluster.named_nodes = nodes
    yield cluster
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
