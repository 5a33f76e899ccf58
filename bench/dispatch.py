"""Benchmark: one MoE layer's dispatch round trip to 2 workers on this host, per transport.

For T tokens at width D (bf16), the dispatcher sends each of 2 workers (4 experts each) its rows and sums
the answers. Dispatch overhead = round trip − the slowest worker's compute time. Each row has a floor
measured in the same run: for gRPC (unary calls or persistent bidi streams) a raw gRPC echo of the same
request/answer sizes sent the same way; for shared memory the time to copy each request and answer once.
Beside the stream rows, a torch.distributed (gloo) echo of the same bytes to two peer processes: the
cross-host candidate (docs/performance.md).

    python bench/dispatch.py [--tokens 1,8,64,256] [--dims 256,6144] [--iters 50] [--transports …] [--json out]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
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
    """The exact (request bytes, reply size) per worker that this dispatch sends (a reply is in f32 when some
    of its rows have an expert on the other worker, else in the activation dtype)."""
    out = []
    for call in route(dispatcher.owner[0], ids.numpy()):
        rows = torch.from_numpy(call.rows)
        req = wire.encode_request_bytes(1, 0, hidden[rows], torch.from_numpy(call.expert_ids), probs[rows])
        itemsize = 4 if (call.expert_ids < 0).any() else hidden.element_size()
        out.append((req, len(rows) * hidden.shape[1] * itemsize + 32))
    return out


def memcpy_seconds(sizes: list[tuple[bytes, int]], iterations: int) -> list[float]:
    """Copying each request and each answer once (the floor a shared-memory hop is compared to)."""
    buffers = [(np.frombuffer(req, dtype=np.uint8), np.empty(len(req), np.uint8), np.ones(reply, np.uint8),
                np.empty(reply, np.uint8)) for req, reply in sizes]
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        for src, dst, answer, answer_dst in buffers:
            np.copyto(dst, src)
            np.copyto(answer_dst, answer)
        times.append(time.perf_counter() - start)
    return times


class GlooPeers:
    """Two torch.distributed (gloo) echo peers (bench/gloo_peer.py): each round trip sends every peer its
    request bytes and receives its reply bytes, both peers at once, as a layer's dispatch would."""

    def __init__(self, peers: int = 2):
        import socket

        import torch.distributed as dist

        self.dist = dist
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.procs = [subprocess.Popen([sys.executable, str(HERE / "gloo_peer.py"), str(r + 1), str(peers + 1),
                                        str(port)], stdout=subprocess.DEVNULL) for r in range(peers)]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=peers + 1)
        self.peers = peers

    def timed(self, sizes: list[tuple[bytes, int]], iterations: int) -> list[float]:
        dist = self.dist
        requests = [torch.frombuffer(bytearray(req), dtype=torch.uint8) for req, _ in sizes]
        replies = [torch.empty(reply, dtype=torch.uint8) for _, reply in sizes]
        for peer in range(self.peers):
            index = min(peer, len(sizes) - 1)
            header = torch.tensor([len(sizes[index][0]), sizes[index][1], iterations], dtype=torch.int64)
            dist.send(header, dst=peer + 1)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            works = []
            for peer in range(self.peers):
                index = min(peer, len(sizes) - 1)
                works.append(dist.isend(requests[index], dst=peer + 1))
                works.append(dist.irecv(replies[index], src=peer + 1))
            for work in works:
                work.wait()
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        for peer in range(self.peers):
            self.dist.send(torch.tensor([0, 0, 0], dtype=torch.int64), dst=peer + 1)
        self.dist.destroy_process_group()
        for proc in self.procs:
            proc.wait(timeout=30)


def settings_for(transport: str) -> DispatchSettings:
    if transport == "shm":
        return DispatchSettings(transport="shm")
    return DispatchSettings(transport="grpc", grpc_call=transport)


def run(args) -> list[dict]:
    results = []
    generator = torch.Generator().manual_seed(0)
    gloo = GlooPeers() if "gloo" in args.transports else None
    try:
        for d_model in args.dims:
            results += run_width(args, d_model, generator, gloo)
    finally:
        if gloo is not None:
            gloo.close()
    return results


def run_width(args, d_model: int, generator: torch.Generator, gloo: GlooPeers | None) -> list[dict]:
    results = []
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
            for transport in [t for t in args.transports if t != "gloo"]:
                loop = LoopThread("bench-dispatch")
                dispatcher = Dispatcher(config, plan, endpoints, torch.bfloat16, loop, settings_for(transport))
                echo = EchoClient(echo_addrs, transport) if transport != "shm" else None
                for t in args.tokens:
                    hidden, ids, probs = routed_inputs(t, config, generator)
                    sizes = message_sizes(dispatcher, hidden, ids, probs)
                    rtt, compute, floor, gloo_rtt = [], [], [], []
                    timed_dispatch(dispatcher, hidden, ids, probs, args.warmup)
                    for _ in range(args.iters):  # interleave so every candidate sees the same machine load
                        r, c = timed_dispatch(dispatcher, hidden, ids, probs, 1)
                        rtt += r
                        compute += c
                        floor += echo.timed(sizes, 1) if echo is not None else memcpy_seconds(sizes, 1)
                    if gloo is not None and transport == "stream":
                        gloo_rtt = gloo.timed(sizes, args.iters)
                    overhead = [r - c for r, c in zip(rtt, compute, strict=True)]
                    row = {"d_model": d_model, "tokens": t, "transport": transport,
                           "request_bytes": sum(len(b) for b, _ in sizes),
                           "reply_bytes": sum(r for _, r in sizes),
                           "dispatch_ms_p50": 1e3 * statistics.median(rtt),
                           "worker_compute_ms_p50": 1e3 * statistics.median(compute),
                           "overhead_ms_p50": 1e3 * statistics.median(overhead),
                           "floor": "memcpy" if echo is None else "grpc echo",
                           "floor_ms_p50": 1e3 * statistics.median(floor)}
                    row["overhead_over_floor"] = row["overhead_ms_p50"] / row["floor_ms_p50"]
                    if gloo_rtt:
                        row["gloo_echo_ms_p50"] = 1e3 * statistics.median(gloo_rtt)
                    results.append(row)
                    print_row(row)
                dispatcher.close()
                loop.stop()
                if echo is not None:
                    echo.close()
        finally:
            for proc in procs:
                proc.kill()
    return results


def print_row(row: dict) -> None:
    gloo = f"  gloo echo={row['gloo_echo_ms_p50']:7.3f} ms" if "gloo_echo_ms_p50" in row else ""
    print(f"D={row['d_model']:>5} T={row['tokens']:>4} {row['transport']:>6}  bytes={row['request_bytes']:>9}  "
          f"dispatch={row['dispatch_ms_p50']:7.3f} ms  compute={row['worker_compute_ms_p50']:6.3f} ms  "
          f"overhead={row['overhead_ms_p50']:7.3f} ms  {row['floor']}={row['floor_ms_p50']:7.3f} ms  "
          f"ratio={row['overhead_over_floor']:5.2f}{gloo}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,8,64,256", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--dims", default="256,6144", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--transports", default="unary,stream,shm,gloo", type=lambda s: s.split(","),
                        help="dispatch transports to measure (gloo: torch.distributed echo beside the stream rows)")
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
