"""The Ray Serve application: a router deployment and one deployment per expert shard, from a ClusterSpec.

Expert replicas run the worker gRPC server and register their address with the registry actor; router
replicas run the client-facing Generation server on the spec's port and keep their dispatcher's endpoints
in step with the registry. `app_builder` is the import path for `serve run` / KubeRay's serveConfigV2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import ray
import torch
from ray import serve

from grokserve.cluster.registry import get_registry
from grokserve.cluster.spec import METRICS_PORT_SPAN, ClusterSpec, parse_spec
from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.model.config import GrokConfig
from grokserve.transport.loop_thread import LoopThread
from grokserve.transport.metrics_server import serve_metrics

log = logging.getLogger(__name__)
HEALTH_PERIOD_S = 2.0
REGISTRY_TTL_S = 3 * HEALTH_PERIOD_S + 2


def resolve_device(device: str) -> str:
    """'auto' → the GPU Ray assigned to this replica when there is one, else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
    return device


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (direct use in tests)
        return f"local-{id(object())}"


@serve.deployment
class ExpertShardReplica:
    """One replica of one expert shard: the ExpertService gRPC server, registered with the registry."""

    def __init__(self, spec_json: str, shard_name: str):
        from grokserve.workers.server import ExpertWorker, WorkerSettings

        spec = ClusterSpec.model_validate_json(spec_json)
        checkpoint = spec.model.checkpoint_path()
        config = GrokserveCheckpoint(checkpoint).config
        shard = next(s for s in spec.placement(config).shards if s.name == shard_name)
        if spec.experts.threads:
            torch.set_num_threads(spec.experts.threads)
        self.shard_name = shard_name
        self.node_id = ray.get_runtime_context().get_node_id()
        settings = WorkerSettings(checkpoint=checkpoint, shard=shard.as_map(), dtype=spec.model.dtype,
                                  weights=spec.model.weights, device=resolve_device(spec.model.device),
                                  max_rows=spec.experts.max_rows,
                                  shared_memory=spec.experts.shared_memory,
                                  host=ray.util.get_node_ip_address(), port=0,
                                  metrics_port=spec.experts.metrics_port, metrics_port_span=METRICS_PORT_SPAN,
                                  shard_name=shard_name, tls=spec.security.dispatch_tls())
        self.io = LoopThread(f"expert-{shard_name}")

        async def start():
            worker = ExpertWorker(settings)
            await worker.start()  # returns once the weights are resident and health is SERVING
            return worker

        self.worker = self.io.run(start())
        self.replica_id = _replica_id()
        self.registry = get_registry()
        self._register()
        log.info("expert shard %s replica %s serving on %s", shard_name, self.replica_id, self.worker.address)

    def _register(self) -> None:
        ray.get(self.registry.register.remote(self.shard_name, self.replica_id, self.worker.address, self.node_id,
                                              os.getpid()), timeout=10)

    def check_health(self) -> None:
        """Healthy = weights loaded and the gRPC server running. Also refreshes the registry entry; a slow
        registry is not this replica's illness, so a failed refresh is logged, not raised (else Serve would
        restart a working replica under load)."""
        if self.worker.servicer.experts is None:
            raise RuntimeError("expert weights are not loaded")
        try:
            self._register()
        except Exception as exc:
            log.warning("registry refresh failed (entry expires in %.0fs if this persists): %s", REGISTRY_TTL_S, exc)

    def address(self) -> str:
        return self.worker.address

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # the process is going away anyway
            self.registry.unregister.remote(self.replica_id)
            self.io.run(self.worker.stop(), timeout=15)


@serve.deployment
class RouterReplica:
    """One router replica: dense weights, KV cache, scheduler, dispatcher and the Generation gRPC server."""

    def __init__(self, spec_json: str, *expert_deployments):
        from grokserve.router.assembly import build_router
        from grokserve.router.auth import load_tokens
        from grokserve.router.http_api import HttpApi, chat_template_from, start_http_server
        from grokserve.router.service import GenerationService, start_router_server

        spec = ClusterSpec.model_validate_json(spec_json)
        self.spec = spec
        checkpoint = spec.model.checkpoint_path()
        config = GrokserveCheckpoint(checkpoint).config
        self.plan = spec.placement(config)
        if spec.router.threads:
            torch.set_num_threads(spec.router.threads)
        self.registry = get_registry()
        self.router = build_router(checkpoint, spec.model.dtype, resolve_device(spec.model.device), self.plan,
                                   self._endpoints(), spec.router.limits, spec.router.dispatch,
                                   spec.security.dispatch_tls(), spec.model.weights)
        self.metrics_port = None
        if spec.router.metrics_port is not None:
            self.metrics_port = serve_metrics(self.router.metrics.registry, ray.util.get_node_ip_address(),
                                              spec.router.metrics_port, METRICS_PORT_SPAN)
        service = GenerationService(self.router.engine, self.router.tokenizer, self.router.model_id)
        self.service = service
        self.io = self.router.loop  # the client API runs on the engine's loop (router/engine.py)
        tokens = load_tokens(spec.security.tokens_file) if spec.security.tokens_file else None
        self.server, self.port = self.io.run(start_router_server(
            service, spec.router.host, spec.router.grpc_port, spec.security.client_tls_files(), tokens))
        self.http = None
        self.http_port = None
        if spec.router.http_port is not None:
            api = HttpApi(service, tokens, chat_template_from(spec.router.chat_template, spec.router.chat_stop),
                          spec.router.served_model_name)
            server, self.http_port, task = self.io.run(start_http_server(
                api, spec.router.host, spec.router.http_port, spec.security.client_tls_files()))
            self.http = (server, task)
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="registry-watch").start()

    def _endpoints(self) -> dict[str, list[str]]:
        snapshot = ray.get(self.registry.snapshot.remote(REGISTRY_TTL_S), timeout=10)
        return {s.name: [r["address"] for r in snapshot.get(s.name, [])] for s in self.plan.shards}

    def _watch(self) -> None:
        """Follow the registry: new replicas are used at once, vanished ones dropped."""
        dispatcher = self.router.dispatcher
        assert dispatcher is not None  # a router of the cluster always dispatches to expert deployments
        while not self._stop.wait(1.0):
            try:
                endpoints = self._endpoints()
                current = dispatcher.endpoints()
                for shard, addresses in endpoints.items():
                    if sorted(addresses) != sorted(current.get(shard, [])):
                        dispatcher.set_endpoints(shard, addresses)
                self.service.shards = {s: ",".join(a) for s, a in endpoints.items()}
            except Exception as exc:  # keep watching; the dispatcher keeps its last endpoints
                log.warning("registry poll failed: %s", exc)

    def check_health(self) -> None:
        """Healthy = engine loop alive and gRPC server started (dense weights are loaded by then)."""
        if not self.router.engine.is_alive():
            raise RuntimeError(f"engine loop ended: {self.router.engine.failure()}")

    def stats(self) -> dict:
        dispatcher = self.router.dispatcher
        assert dispatcher is not None  # a router of the cluster always dispatches to expert deployments
        return {"port": self.port, "http_port": self.http_port, "metrics_port": self.metrics_port,
                "node_id": ray.get_runtime_context().get_node_id(),
                "load": self.router.engine.load(), "endpoints": dispatcher.endpoints(),
                "replicas": dispatcher.replica_states(), "dispatch": vars(dispatcher.stats).copy(),
                "steps": self.router.engine.steps}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._stop.set()
            if self.http is not None:
                from grokserve.router.http_api import stop_http_server

                self.io.run(stop_http_server(*self.http), timeout=20)
            self.io.run(self.server.stop(grace=5), timeout=10)
            self.router.shutdown()


def build_app(spec: ClusterSpec, config: GrokConfig | None = None):
    """ClusterSpec → a Serve Application (router ingress bound to every expert shard deployment).
    `config` defaults to the checkpoint's own (read from disk)."""
    config = config or GrokserveCheckpoint(spec.model.checkpoint_path()).config
    plan = spec.placement(config)
    spec_json = spec.model_dump_json()
    experts = [
        ExpertShardReplica.options(  # type: ignore[attr-defined]  # added by @serve.deployment
            name=f"expert-{shard.name}", num_replicas=shard.replicas,
            ray_actor_options=spec.shard_actor_options(shard.name).to_ray(),
            health_check_period_s=HEALTH_PERIOD_S, health_check_timeout_s=30, graceful_shutdown_timeout_s=10,
            max_ongoing_requests=16,
        ).bind(spec_json, shard.name)
        for shard in plan.shards
    ]
    return RouterReplica.options(  # type: ignore[attr-defined]  # added by @serve.deployment
        name="router", num_replicas=spec.router.replicas, ray_actor_options=spec.router.ray_actor_options.to_ray(),
        health_check_period_s=HEALTH_PERIOD_S, health_check_timeout_s=30, graceful_shutdown_timeout_s=10,
    ).bind(spec_json, *experts)


def app_builder(args: dict) -> serve.Application:
    """Serve application builder (`import_path: grokserve.cluster.app:app_builder`, args = a cluster spec)."""
    return build_app(parse_spec(args))


def wait_until_ready(spec: ClusterSpec, timeout: float, progress=None) -> dict:
    """Block until the router answers on gRPC with every shard covered; returns its stats."""
    from grokserve.client import Client

    deadline = time.monotonic() + timeout
    handle = serve.get_deployment_handle("router", app_name=spec.name)
    last_error = ""
    while time.monotonic() < deadline:
        try:
            stats = handle.stats.remote().result(timeout_s=10)
            missing = [s for s, a in stats["endpoints"].items() if not a]
            if progress:
                progress(stats, missing)
            if not missing:
                if spec.security.client_tls is None and spec.security.tokens_file is None:
                    with Client(f"{spec.router.host}:{stats['port']}", timeout=10) as client:
                        client.wait_ready(timeout=10)
                        client.model_info()
                return stats
        except Exception as exc:  # not deployed yet
            last_error = str(exc)
        time.sleep(1.0)
    raise TimeoutError(f"the cluster did not become ready within {timeout:.0f}s ({last_error})")
