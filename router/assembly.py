"""Assemble a router: dense weights from a grokserve checkpoint + experts in process or behind a dispatcher.

Used by `grokserve router`, the Ray Serve deployment and tests. With a list of worker addresses the
placement is learned from each worker's Info (and checked against the model), not typed in by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.model.config import GrokConfig
from grokserve.model.dense import DenseModel, ExpertBackend, GrokModel
from grokserve.model.dtypes import torch_dtype
from grokserve.model.experts import LocalExperts
from grokserve.model.tokenizer import Tokenizer
from grokserve.router.dispatcher import Dispatcher
from grokserve.router.engine import RouterEngine
from grokserve.router.metrics import RouterMetrics
from grokserve.router.settings import DispatchSettings, EngineLimits
from grokserve.transport import wire
from grokserve.transport.errors import PlacementMismatch
from grokserve.transport.loop_thread import LoopThread
from grokserve.transport.placement import PlacementPlan, Shard
from grokserve.transport.tls import TlsFiles
from grokserve.v1 import expert_pb2 as pb
from grokserve.v1 import expert_pb2_grpc as pb_grpc


def discover_plan(addresses: list[str], config: GrokConfig, timeout: float = 10.0, tls: TlsFiles | None = None
                  ) -> tuple[PlacementPlan, dict[str, list[str]]]:
    """Ask every worker which shard it holds; identical shards become replicas of one."""
    shards: dict[tuple, list[str]] = {}
    for address in addresses:
        channel = (grpc.secure_channel(address, tls.channel_credentials(), tls.channel_options()) if tls
                   else grpc.insecure_channel(address))
        with channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout)
                info = pb_grpc.ExpertServiceStub(channel).Info(pb.InfoRequest(), timeout=timeout)
            except (grpc.RpcError, grpc.FutureTimeoutError) as exc:
                raise PlacementMismatch(f"worker {address}: no Info answer ({exc})") from None
        if info.model_id != wire.model_id(config):
            raise PlacementMismatch(f"worker {address} serves model {info.model_id}, "
                                    f"this router {wire.model_id(config)}")
        layers = tuple(sorted(s.layer for s in info.shard))
        experts = {tuple(sorted(s.expert_ids)) for s in info.shard}
        if len(experts) != 1:
            raise PlacementMismatch(f"worker {address} holds different experts per layer; not supported")
        shards.setdefault((layers, experts.pop()), []).append(address)
    plan_shards, endpoints = [], {}
    for i, ((layers, experts), addrs) in enumerate(sorted(shards.items())):
        name = f"shard-{i}"
        plan_shards.append(Shard(name=name, layers=layers, experts=experts, replicas=len(addrs)))
        endpoints[name] = addrs
    return PlacementPlan(shards=tuple(plan_shards)).check(config), endpoints


@dataclass
class Router:
    engine: RouterEngine
    tokenizer: Tokenizer | None
    model_id: str
    dispatcher: Dispatcher | None
    metrics: RouterMetrics
    loop: LoopThread

    def shutdown(self) -> None:
        self.engine.shutdown()
        if self.dispatcher is not None:
            self.dispatcher.close()
        self.loop.stop()


def build_router(checkpoint: str | Path, dtype: str = "float32", device: str = "cpu",
                 plan: PlacementPlan | None = None, endpoints: dict[str, list[str]] | None = None,
                 limits: EngineLimits | None = None, dispatch: DispatchSettings | None = None,
                 dispatch_tls: TlsFiles | None = None, weights: str = "dense") -> Router:
    """Load the dense half (and, without a plan, every expert) and start an engine. Its metrics are collected
    into `Router.metrics.registry`; serving them (/metrics) is the caller's choice. `weights`: "dense" or
    "int8" (the attention matrices, and in-process experts, resident as int8: model/int8.py)."""
    ckpt = GrokserveCheckpoint(checkpoint)
    config, dt = ckpt.config, torch_dtype(dtype)
    metrics = RouterMetrics(config)
    dense = DenseModel(config, dt, ckpt.lazy(ckpt.dense_names(), progress="loading dense weights"), device, weights)
    loop = LoopThread("router-engine")  # the engine's loop, handed to the dispatcher: no thread hop per layer
    dispatcher = None
    experts: ExpertBackend
    if plan is None:  # experts in process
        everything = {layer: list(range(config.n_experts)) for layer in range(config.n_layers)}
        experts = LocalExperts(config, everything, dt,
                               ckpt.lazy(ckpt.expert_names(everything), progress="loading experts"), device, weights)
    else:
        experts = dispatcher = Dispatcher(config, plan, endpoints or {}, dt, loop, dispatch, metrics, dispatch_tls)
    tokenizer = Tokenizer(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
    engine = RouterEngine(GrokModel(dense, experts), limits or EngineLimits(), metrics, loop)
    return Router(engine, tokenizer, wire.model_id(config), dispatcher, metrics, loop)
