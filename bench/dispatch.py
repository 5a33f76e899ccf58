"""Benchmark: one MoE layer's dispatch round trip over loopback vs a raw gRPC echo of the same bytes.

For T tokens at width D (bf16), the dispatcher sends each of 2 workers (4 experts each) its rows and sums
the answers. Dispatch overhead = round trip − the slowest worker's compute time; the target is
overhead ≤ 1.3 × the echo round trip of the same request/response sizes, sent the same way (unary
futures or persistent bidi streams, to both servers at once).

    python bench/dispatch.py [--tokens 1,8,64,256] [--dims 256,6144] [--iters 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from grokserve.cluster.placement import auto_plan
from grokserve.model.checkpoint.grokserve_format import write_checkpoint
from grokserve.model.config import GrokConfig
from grokserve.model.random_init import random_params
from grokserve.router.dispatcher import Dispatcher
from grokserve.workers import wire

HERE = Path(__file__).resolve().parent
LIMIT = 256 * 1024 * 1024


def bench_config(d_model: int) -> GrokConfig:
    """One layer of width D with tiny expert FFNs (8): the benchmark measures transport, not FLOPs."""
    return GrokConfig(name=f"dispatch-bench-d{d_model}", vocab_size=256, d_model=d_model, n_layers=1, n_q_heads=4,
                      n_kv_heads=4, head_dim=8, widening_factor=12 / d_model, n_experts=8, n_experts_per_token=2,
                      max_seq_len=64)


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if "SERVING on" in line:
            return proc, line.split("SERVING on ")[1].split()[0]
    raise RuntimeError(f"failed to start {args}")


class EchoClient:
    """Sends the same byte sizes as a dispatch, to several echo servers at once."""

    def __init__(self, addresses: list[str], transport: str):
        self.channels = [grpc.insecure_channel(a, options=[("grpc.max_receive_message_length", LIMIT),
                                                           ("grpc.max_send_message_length", LIMIT)])
                         for a in addresses]
        self.transport = transport
        self.unary = [c.unary_unary("/bench.Echo/Unary") for c in self.channels]
        self.streams = []
        if transport == "stream":
            for c in self.channels:
                requests: queue.Queue = queue.Queue()
                responses: queue.Queue = queue.Queue()
                call = c.stream_stream("/bench.Echo/Stream")(iter(requests.get, None))
                threading.Thread(target=lambda call=call, r=responses: [r.put(x) for x in call], daemon=True).start()
                self.streams.append((requests, responses, call))

    def round_trip(self, messages: list[tuple[bytes, int]]) -> None:
        payloads = [reply.to_bytes(8, "little") + body for body, reply in messages]
        if self.transport == "unary":
            futures = [stub.future(p, timeout=30) for stub, p in zip(self.unary, payloads, strict=False)]
            for f in futures:
                f.result()
        else:
            for (requests, _, _), p in zip(self.streams, payloads, strict=False):
                requests.put(p)
            for (_, responses, _), _p in zip(self.streams, payloads, strict=False):
                responses.get(timeout=30)

    def close(self) -> None:
        for requests, _, call in self.streams:
            requests.put(None)
            call.cancel()
        for c in self.channels:
            c.close()


def routed_inputs(t: int, config: GrokConfig, generator: torch.Generator):
    hidden = torch.randn(t, config.d_model, generator=generator).to(torch.bfloat16)  # [T, D]
    ids = torch.stack([torch.randperm(config.n_experts, generator=generator)[:2] for _ in range(t)])  # [T, 2]
    gates = torch.rand(t, 2, generator=generator) * 0.5  # [T, 2]
    return hidden, ids, gates


def message_sizes(dispatcher: Dispatcher, hidden, ids, gates) -> list[tuple[bytes, int]]:
    """The exact (request bytes, reply size) per worker that this dispatch sends."""
    owner = dispatcher.owner[0][ids]
    out = []
    for shard in torch.unique(owner).tolist():
        mine = owner == shard
        rows = mine.any(dim=1).nonzero().squeeze(1)
        sub_ids = torch.where(mine, ids, torch.full_like(ids, -1))[rows]
        req = wire.encode_request(1, 0, hidden[rows], sub_ids, gates[rows])
        reply = len(rows) * hidden.shape[1] * 2 + 32
        out.append((req.SerializeToString(), reply))
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
                    proc, addr = start([sys.executable, "-m", "grokserve.cluster.cli", "worker", "--checkpoint", tmp,
                                        "--experts", ",".join(map(str, shard.experts)), "--dtype", "bfloat16",
                                        "--threads", "1", "--max-rows", "4096"])
                    procs.append(proc)
                    endpoints[shard.name] = [addr]
                for _ in plan.shards:
                    proc, addr = start([sys.executable, str(HERE / "echo_server.py"), "0"])
                    procs.append(proc)
                    echo_addrs.append(addr)
                for transport in ("unary", "stream"):
                    dispatcher = Dispatcher(config, plan, endpoints, torch.bfloat16, transport=transport)
                    echo = EchoClient(echo_addrs, transport)
                    for t in args.tokens:
                        hidden, ids, gates = routed_inputs(t, config, generator)
                        sizes = message_sizes(dispatcher, hidden, ids, gates)
                        rtt, compute, echo_rtt = [], [], []
                        for i in range(args.warmup + args.iters):
                            start_t = time.perf_counter()
                            dispatcher.forward(0, hidden, ids, gates)
                            elapsed = time.perf_counter() - start_t
                            e0 = time.perf_counter()
                            echo.round_trip(sizes)
                            e1 = time.perf_counter()
                            if i >= args.warmup:
                                rtt.append(elapsed)
                                compute.append(dispatcher.stats.last_compute_seconds)
                                echo_rtt.append(e1 - e0)
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
