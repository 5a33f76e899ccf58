"""Run one router standalone: `grokserve router --checkpoint DIR [--workers HOST:PORT,...] --port P`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

import torch

from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.router.assembly import build_router, discover_plan
from grokserve.router.auth import load_tokens
from grokserve.router.http_api import HttpApi, chat_template_from, start_http_server, stop_http_server
from grokserve.router.service import GenerationService, start_router_server
from grokserve.router.settings import DispatchSettings, EngineLimits
from grokserve.transport.lifecycle import announce_serving
from grokserve.transport.metrics_server import serve_metrics
from grokserve.transport.tls import TlsFiles, dispatch_tls

log = logging.getLogger(__name__)


def settings_from_args(args: argparse.Namespace) -> tuple[EngineLimits, DispatchSettings]:
    """The CLI's options carry the settings' own field names (cluster/cli.py builds them from the models)."""
    limits = EngineLimits(**{name: getattr(args, name) for name in EngineLimits.model_fields})
    dispatch = DispatchSettings(**{name: getattr(args, f"dispatch_{name}") for name in DispatchSettings.model_fields})
    return limits, dispatch


async def run_router(args: argparse.Namespace) -> None:
    plan = endpoints = None
    tls = dispatch_tls(args.dispatch_ca, args.dispatch_cert, args.dispatch_key, args.dispatch_server_name)
    if args.workers:
        config = GrokserveCheckpoint(args.checkpoint).config
        plan, endpoints = discover_plan([a.strip() for a in args.workers.split(",") if a.strip()], config, tls=tls)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    client_tls = TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert else None
    tokens = load_tokens(args.tokens_file) if args.tokens_file else None
    limits, dispatch = settings_from_args(args)
    router = build_router(args.checkpoint, args.dtype, args.device, plan, endpoints, limits, dispatch, tls,
                          args.weights)
    metrics = ""
    if args.metrics_port is not None:
        metrics = f", metrics :{serve_metrics(router.metrics.registry, args.host, args.metrics_port)}"
    shards = {name: ",".join(addrs) for name, addrs in (endpoints or {}).items()}
    service = GenerationService(router.engine, router.tokenizer, router.model_id, shards)
    # the client API runs on the engine's loop (router/engine.py): no thread hop between them
    server, port = router.loop.run(start_router_server(service, args.host, args.port, client_tls, tokens))
    http = None
    if args.http_port is not None and args.http_port >= 0:
        api = HttpApi(service, tokens, chat_template_from(args.chat_template, args.chat_stop), args.served_model_name)
        http_server, http_port, http_task = router.loop.run(start_http_server(api, args.host, args.http_port,
                                                                              client_tls))
        http = (http_server, http_task)
        metrics += f", OpenAI HTTP API http{'s' if client_tls else ''}://{args.host}:{http_port}/v1"
    placement = f"{len(shards)} expert shards" if shards else "experts in process"
    announce_serving("router", f"{args.host}:{port}", f"({router.model_id}, {placement}{metrics})")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("router on %s:%d draining", args.host, port)
    if http is not None:
        router.loop.run(stop_http_server(*http), timeout=30)
    router.loop.run(_drain(server), timeout=30)
    router.shutdown()
    log.info("router on %s:%d stopped", args.host, port)


async def _drain(server) -> None:
    await server.health.enter_graceful_shutdown()
    await server.stop(grace=10)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_router(args))
    return 0
