"""Run one expert worker standalone (outside Ray): `grokserve worker --checkpoint DIR --layers … --experts …`."""

from __future__ import annotations

import asyncio
import logging
import signal

import torch

from grokserve.cluster.cli import dispatch_tls
from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.workers.server import WorkerProcess, WorkerSettings, parse_layers


def settings_from_args(args) -> WorkerSettings:
    config = GrokserveCheckpoint(args.checkpoint).config
    layers = parse_layers(args.layers, config.n_layers)
    experts = parse_layers(args.experts, config.n_experts)
    return WorkerSettings(checkpoint=args.checkpoint, shard={layer: experts for layer in layers}, dtype=args.dtype,
                          device=args.device, max_rows=args.max_rows, host=args.host, port=args.port,
                          metrics_port=args.metrics_port, shard_name=args.shard_name, tls=dispatch_tls(args))


async def run_worker(settings: WorkerSettings) -> None:
    worker = WorkerProcess(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"grokserve worker listening on {worker.address} (loading weights)", flush=True)
    await worker.start()
    shard = ", ".join(f"L{layer}:{list(e)}" for layer, e in list(settings.shard.items())[:4])
    metrics = f" metrics :{worker.metrics_port}" if worker.metrics_port else ""
    print(f"grokserve worker SERVING on {worker.address} shard {shard}{' …' if len(settings.shard) > 4 else ''}"
          f"{metrics}", flush=True)
    await stop.wait()
    print("grokserve worker draining", flush=True)
    await worker.stop()


def main(args) -> int:
    logging.basicConfig(level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    asyncio.run(run_worker(settings_from_args(args)))
    return 0
