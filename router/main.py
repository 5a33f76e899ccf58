"""Run one router standalone: `grokserve router --checkpoint DIR [--workers HOST:PORT,...] --port P`."""

from __future__ import annotations

import asyncio
import logging
import signal

import torch

from grokserve.cluster.cli import dispatch_tls
from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.router.assembly import build_router, discover_plan
from grokserve.router.auth import load_tokens
from grokserve.router.engine import EngineLimits
from grokserve.router.service import GenerationService, start_router_server
from grokserve.workers.metrics import serve_metrics
from grokserve.workers.tls import TlsFiles


async def run_router(args) -> None:
    plan = endpoints = None
    dispatch = dispatch_tls(args)
    if args.workers:
        config = GrokserveCheckpoint(args.checkpoint).config
        plan, endpoints = discover_plan([a.strip() for a in args.workers.split(",") if a.strip()], config,
                                        tls=dispatch)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    client_tls = TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert else None
    tokens = load_tokens(args.tokens_file) if args.tokens_file else None
    limits = EngineLimits(max_queue=args.max_queue, max_running=args.max_running,
                          max_step_tokens=args.max_step_tokens, kv_cache_bytes=args.kv_cache_mb << 20,
                          max_tokens_limit=args.max_tokens_limit, micro_batch_overlap=args.micro_batch_overlap)
    router = build_router(args.checkpoint, args.dtype, args.device, plan, endpoints, limits, args.transport,
                          metrics=args.metrics_port is not None, dispatch_tls=dispatch)
    metrics = ""
    if router.metrics is not None:
        metrics = f", metrics :{serve_metrics(router.metrics.registry, args.host, args.metrics_port)}"
    shards = {name: ",".join(addrs) for name, addrs in (endpoints or {}).items()}
    service = GenerationService(router.engine, router.tokenizer, router.model_id, shards)
    server, port = await start_router_server(service, args.host, args.port, client_tls, tokens)
    placement = f"{len(shards)} expert shards" if shards else "experts in process"
    print(f"grokserve router SERVING on {args.host}:{port} ({router.model_id}, {placement}{metrics})", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.health.enter_graceful_shutdown()
    await server.stop(grace=10)
    router.shutdown()


def main(args) -> int:
    logging.basicConfig(level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    asyncio.run(run_router(args))
    return 0
