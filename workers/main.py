"""Run one expert worker standalone (outside Ray): `grokserve worker --checkpoint DIR --layers … --experts …`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

import torch

from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.transport.lifecycle import announce_serving
from grokserve.transport.placement import parse_indices
from grokserve.transport.tls import dispatch_tls
from grokserve.workers.server import ExpertWorker, WorkerSettings

log = logging.getLogger(__name__)


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    config = GrokserveCheckpoint(args.checkpoint).config
    try:
        layers = parse_indices(args.layers, config.n_layers)
    except ValueError as exc:
        raise ValueError(f"--layers: {exc}") from None
    try:
        experts = list(parse_indices(args.experts, config.n_experts))
    except ValueError as exc:
        raise ValueError(f"--experts: {exc}") from None
    return WorkerSettings(checkpoint=args.checkpoint, shard={layer: experts for layer in layers}, dtype=args.dtype,
                          weights=args.weights,
                          device=args.device, max_rows=args.max_rows, host=args.host, port=args.port,
                          shared_memory=args.shared_memory,
                          metrics_port=args.metrics_port, shard_name=args.shard_name,
                          tls=dispatch_tls(args.dispatch_ca, args.dispatch_cert, args.dispatch_key,
                                           args.dispatch_server_name))


async def run_worker(settings: WorkerSettings) -> None:
    worker = ExpertWorker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"grokserve worker listening on {worker.address} (loading weights)", flush=True)
    await worker.start()
    shard = ", ".join(f"L{layer}:{list(e)}" for layer, e in list(settings.shard.items())[:4])
    more = " …" if len(settings.shard) > 4 else ""
    metrics = f" metrics :{worker.metrics_port}" if worker.metrics_port else ""
    announce_serving("worker", worker.address, f"shard {shard}{more}{metrics}")
    await stop.wait()
    log.info("worker on %s asked to stop", worker.address)
    await worker.stop()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker(settings_from_args(args)))
    return 0
