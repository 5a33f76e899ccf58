"""Benchmark: one MoE layer's dispatch round trip over loopback vs a raw gRPC echo of the same bytes.

For T tokens at width D (bf16), the dispatcher sends each of 2 workers (4 experts each) its rows and sums
the answers. Dispatch overhead = round trip − the slowest worker's compute time; the target is
overhead ≤ 1.3 × the echo round trip of the same request/response sizes, sent the same way (unary
futures or persistent bidi streams, to both servers at once).

    python bench/dispatch.py [--tokens 1,8,64,256] [--dims 256,6144] [--iters 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from grokserve.model.checkpoint.grokserve_format import write_checkpoint
from grokserve.model.config import GrokConfig
from grokserve.model.random_init import random_params
from grokserve.router.dispatcher import Dispatcher, route
from grokserve.router.settings import DispatchSettings
from grokserve.transport import wire
from grokserve.transport.loop_thread import LoopThread
from grokserve.transport.placement import auto_plan

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from load import start_process  # noqa: E402

LIMIT = 256 * 1024 * 1024


def bench_config(d_model: int) -> GrokConfig:
    """One layer of width D with tiny expert FFNs (8): the benchmark measures transport, not FLOPs."""
    return GrokConfig(name=f"dispatch-bench-d{d_model}", vocab_size=256, d_model=d_model, n_layers=1, n_q_heads=4,
                      n_kv_heads=4, head_dim=8, widening_factor=12 / d_model, n_experts=8, n_experts_per_token=2,
                      max_seq_len=64)


class EchoClient:
    """Sends the same byte sizes as a dispatch, to several echo servers at once, with grpc.aio on its own
    event loop — the same I/O machinery as the dispatcher, so the comparison isolates grokserve's work."""

    def __init__(self, addresses: list[str], transport: str):
        self.io = LoopThread("echo-io")
        self.transport = transport
        self.io.run(self._open(addresses))

    async def _open(self, addresses: list[str]) -> None:
        options = [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)]
        self.channels = [grpc.aio.insecure_channel(a, options=options) for a in addresses]
        self.unary = [c.unary_unary("/bench.Echo/Unary") for c in self.channels]
        self.streams = [c.stream_stream("/bench.Echo/Stream")() for c in self.channels] \
            if self.transport == "stream" else []

    async def round_trip(self, payloads: list[bytes]) -> None:
        if self.transport == "unary":
            await asyncio.gather(*(stub(p, timeout=30) for stub, p in zip(self.unary, payloads, strict=False)))
        else:
            async def one(call, p):
                await call.write(p)
                await call.read()

            await asyncio.gather(*(one(call, p) for call, p in zip(self.streams, payloads, strict=False)))

    def timed(self, messages: list[tuple[bytes, int]], iterations: int) -> list[float]:
        payloads = [reply.to_bytes(8, "little") + body for body, reply in messages]

        async def measure():
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                await self.round_trip(payloads)
                times.append(time.perf_counter() - start)
            return times

        return self.io.run(measure())

    def close(self) -> None:
        async def close_all():
            for call in self.streams:
                call.cancel()
            for c in self.channels:
                await c.close()

        self.io.run(close_all())
        self.io.stop()


def timed_dispatch(dispatcher: Dispatcher, hidden, ids, probs, iterations: int) -> tuple[list[float], list[float]]:
    """Round trips of one layer's dispatch, timed inside the engine loop the dispatcher runs on (as a step runs)."""

    async def measure():
        rtt, compute = [], []
        for _ in range(iterations):
            start = time.perf_counter()
            await dispatcher.forward(0, hidden, ids, probs)
            rtt.append(time.perf_counter() - start)
            compute.append(dispatcher.stats.last_compute_seconds)
        return rtt, compute

    return dispatcher.loop.run(measure())


def routed_inputs(t: int, config: GrokConfig, generator: torch.Generator):
    hidden = torch.randn(t, config.d_model, generator=generator).to(torch.bfloat16)  # [T, D]
    ids = torch.stack([torch.randperm(config.n_experts, generator=generator)[:2] for _ in range(t)])  # [T, 2]
    probs = torch.rand(t, 2, generator=generator) * 0.5  # [T, 2]
    return hidden, ids, probs


def message_sizes(dispatcher: Dispatcher, hidden, ids, probs) -> list[tuple[bytes, int]]:
    """The exact (request bytes, reply size) per worker that this dispatch sends."""
    out = []
    for call in route(dispatcher.owner[0], ids.numpy()):
        rows = torch.from_numpy(call.rows)
        req = wire.encode_request_bytes(1, 0, hidden[rows], torch.from_numpy(call.expert_ids), probs[rows])
        out.append((req, len(rows) * hidden.shape[1] * 2 + 32))
    return out


def run(args) -> list[dict]:
    results = []
    generator = torch.Generator().manual_seed(0)
    for d_model in args.dims:
        config = bench_config(d_model)
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(tmp, config, random_params(config, dtype=torch.bfloat16))
            plan = auto_plan(config, 2)
            procs, endpoints, echo_addrs = [], {}, []
            try:
                for shard in plan.shards:
                    proc, addr = start_process([
                        sys.executable, "-m", "grokserve.cluster.cli", "worker", "--checkpoint", tmp, "--experts",
                        ",".join(map(str, shard.experts)), "--dtype", "bfloat16", "--threads", "1",
                        "--max-rows", "4096"])
                    procs.append(proc)
                    endpoints[shard.name] = [addr]
                for _ in plan.shards:
                    proc, addr = start_process([sys.executable, str(HERE / "echo_server.py"), "0"])
                    procs.append(proc)
                    echo_addrs.append(addr)
                for transport in ("unary", "stream"):
                    loop = LoopThread("bench-dispatch")
                    dispatcher = Dispatcher(config, plan, endpoints, torch.bfloat16, loop,
                                            DispatchSettings(transport=transport))
                    echo = EchoClient(echo_addrs, transport)
                    for t in args.tokens:
                        hidden, ids, probs = routed_inputs(t, config, generator)
                        sizes = message_sizes(dispatcher, hidden, ids, probs)
                        rtt, compute, echo_rtt = [], [], []
                        timed_dispatch(dispatcher, hidden, ids, probs, args.warmup)
                        echo.timed(sizes, args.warmup)
                        for _ in range(args.iters):  # interleave so both see the same machine load
                            r, c = timed_dispatch(dispatcher, hidden, ids, probs, 1)
                            rtt += r
                            compute += c
                            echo_rtt += echo.timed(sizes, 1)
                        overhead = [r - c for r, c in zip(rtt, compute, strict=True)]
                        row = {"d_model": d_model, "tokens": t, "transport": transport,
                               "request_bytes": sum(len(b) for b, _ in sizes),
                               "dispatch_ms_p50": 1e3 * statistics.median(rtt),
                               "worker_compute_ms_p50": 1e3 * statistics.median(compute),
                               "overhead_ms_p50": 1e3 * statistics.median(overhead),
                               "echo_ms_p50": 1e3 * statistics.median(echo_rtt)}
                        row["overhead_over_echo"] = row["overhead_ms_p50"] / row["echo_ms_p50"]
                        results.append(row)
                        print_row(row)
                    dispatcher.close()
                    loop.stop()
                    echo.close()
            finally:
                for proc in procs:
                    proc.kill()
    return results


def print_row(row: dict) -> None:
    print(f"D={row['d_model']:>5} T={row['tokens']:>4} {row['transport']:>6}  bytes={row['request_bytes']:>9}  "
          f"dispatch={row['dispatch_ms_p50']:7.3f} ms  compute={row['worker_compute_ms_p50']:6.3f} ms  "
          f"overhead={row['overhead_ms_p50']:7.3f} ms  echo={row['echo_ms_p50']:7.3f} ms  "
          f"ratio={row['overhead_over_echo']:5.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,8,64,256", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--dims", default="256,6144", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.platform(), "cpus": torch.get_num_threads(),
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
