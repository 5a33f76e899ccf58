"""Load generator for grokserve's Generation API: concurrent streams or Poisson arrivals.

Reports output tokens/s and p50/p90/p99 of time to first token, inter-token latency and end-to-end
latency as JSON, and plots a concurrency sweep. `--compare` runs, in one invocation and with the same
workload, (a) a router with two expert workers and (b) the single-process engine (the router with its
experts in process) behind the same API, and prints (a)/(b) throughput.

    python bench/load.py --address 127.0.0.1:50051 --concurrency 1,8,32
    python bench/load.py --compare --concurrency 1,4,16,32 --json load.json --plot load.png
    python bench/load.py --int8 --dtype bfloat16 --concurrency 32   # router + 2 workers: int8 vs dense weights
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grokserve.client import AsyncClient
from grokserve.cluster.spec import DEMO_CHECKPOINT


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def workload(n: int, seed: int, prompt_tokens: tuple[int, int], output_tokens: tuple[int, int]):
    """Prompt token ids cut from the demo's held-out text, lengths uniform in the given ranges."""
    from grokserve.model.tokenizer import Tokenizer

    ids = Tokenizer(DEMO_CHECKPOINT / "tokenizer.model").encode((DEMO_CHECKPOINT / "heldout.txt").read_text())
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(*prompt_tokens)
        start = rng.randint(0, len(ids) - length - 1)
        out.append((ids[start:start + length], rng.randint(*output_tokens)))
    return out


async def run_level(address: str, requests: list, concurrency: int, rate: float | None, seed: int) -> dict:
    ttft, itl, e2e, tokens, errors = [], [], [], 0, 0
    semaphore = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)

    async with AsyncClient(address, timeout=300) as client:
        async def one(prompt, max_tokens):
            nonlocal tokens, errors
            async with semaphore:
                start = last = time.perf_counter()
                first = True
                try:
                    async for chunk in client.generate_stream(prompt, max_tokens=max_tokens, temperature=0.0,
                                                              ignore_eos=True):
                        now = time.perf_counter()
                        if chunk.token_ids:
                            if first:
                                ttft.append(now - start)
                                first = False
                            else:
                                itl.append(now - last)
                            last = now
                            tokens += len(chunk.token_ids)
                    e2e.append(time.perf_counter() - start)
                except Exception:
                    errors += 1

        began = time.perf_counter()
        tasks = []
        for prompt, max_tokens in requests:
            tasks.append(asyncio.create_task(one(prompt, max_tokens)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - began
    return {"concurrency": concurrency, "rate": rate, "requests": len(requests), "errors": errors,
            "output_tokens": tokens, "seconds": wall, "output_tokens_per_s": tokens / wall,
            "ttft_s": percentiles(ttft), "itl_s": percentiles(itl), "e2e_s": percentiles(e2e)}


def start_process(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:
        if "SERVING on" in line:
            return proc, line.split("SERVING on ")[1].split()[0]
    raise RuntimeError(f"failed to start: {' '.join(args)}")


# top-level folder → grokserve subpackage, as pyproject's package-dir maps them
PACKAGES = {"model": "model", "transport": "transport", "router": "router", "workers": "workers",
            "cluster": "cluster", "client": "client", "v1": "proto/grokserve/v1"}


def source_env(checkout: Path | None) -> dict | None:
    """An environment whose `import grokserve` loads the sources of another checkout (e.g. a worktree of main
    before a change), so both revisions run in one benchmark run; None: this tree."""
    if checkout is None:
        return None
    package = Path(tempfile.mkdtemp(prefix="grokserve-baseline-")) / "grokserve"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, folder in PACKAGES.items():
        if (checkout / folder).is_dir():
            (package / name).symlink_to((checkout / folder).resolve())
    return {**os.environ, "PYTHONPATH": str(package.parent)}


def start_system(kind: str, checkpoint: Path, threads: int, metrics: bool = False, overlap: bool = False,
                 checkout: Path | None = None, dtype: str = "float32", weights: str = "dense"
                 ) -> tuple[list[subprocess.Popen], str]:
    """(a) 'distributed': 2 expert workers + a router; (b) 'local': one router with experts in process.
    With `metrics`, every process collects and serves Prometheus metrics; with `checkout`, the processes run
    that checkout's code; `weights` (dense / int8) is passed only when not dense (older checkouts lack it)."""
    env = source_env(checkout)
    weight_args = ["--weights", weights] if weights != "dense" else []
    cli = [sys.executable, "-m", "grokserve.cluster.cli"]
    metrics_args = ["--metrics-port", "0"] if metrics else []
    procs, workers = [], []
    if kind == "distributed":
        for experts in ("0-3", "4-7"):
            proc, address = start_process([*cli, "worker", "--checkpoint", str(checkpoint), "--experts", experts,
                                           "--threads", "1", "--dtype", dtype, *weight_args, *metrics_args], env)
            procs.append(proc)
            workers.append(address)
    router_args = [*cli, "router", "--checkpoint", str(checkpoint), "--port", "0", "--threads", str(threads),
                   "--dtype", dtype, *weight_args,
                   *metrics_args, *(["--micro-batch-overlap"] if overlap else [])]
    if workers:
        router_args += ["--workers", ",".join(workers)]
    proc, address = start_process(router_args, env)
    procs.append(proc)
    return procs, address


def print_level(name: str, r: dict) -> None:
    print(f"{name:>12} c={r['concurrency']:>3}  {r['output_tokens_per_s']:8.1f} tok/s  "
          f"ttft p50/p99 {r['ttft_s']['p50'] * 1e3:7.1f}/{r['ttft_s']['p99'] * 1e3:7.1f} ms  "
          f"itl p50/p99 {r['itl_s']['p50'] * 1e3:6.1f}/{r['itl_s']['p99'] * 1e3:6.1f} ms  "
          f"e2e p50 {r['e2e_s']['p50'] * 1e3:7.1f} ms  errors {r['errors']}", flush=True)


def sweep(name: str, address: str, args) -> list[dict]:
    results = []
    for concurrency in args.concurrency:
        n = max(args.requests, 2 * concurrency)
        requests = workload(n, args.seed, args.prompt_tokens, args.output_tokens)
        asyncio.run(run_level(address, requests[: min(4, n)], min(concurrency, 4), None, args.seed))  # warm up
        result = asyncio.run(run_level(address, requests, concurrency, args.rate, args.seed))
        result["system"] = name
        print_level(name, result)
        results.append(result)
    return results


def ab_rounds(args, label: str, options) -> list[dict]:
    """Router + 2 workers with `label` off, then on, alternating for --rounds (so slow drifts of the machine
    hit both equally); prints on/off throughput per concurrency. `options(on)` → sweep_system kwargs."""
    results = []
    for _ in range(args.rounds):
        for on in (False, True):
            name = f"{label}-{'on' if on else 'off'}"
            results += sweep_system(name, "distributed", args=args, **options(on))
    for c in args.concurrency:
        def mean(state: str, c=c) -> float:
            return statistics.mean(r["output_tokens_per_s"] for r in results
                                   if r["system"] == f"{label}-{state}" and r["concurrency"] == c)
        print(f"c={c}: {label} on / off throughput = {mean('on') / mean('off'):.3f}")
    return results


def sweep_system(name: str, kind: str, args, metrics: bool = False, overlap: bool = False,
                 checkout: Path | None = None, weights: str | None = None) -> list[dict]:
    """Start a system, sweep it, stop it."""
    procs, address = start_system(kind, Path(args.checkpoint), args.router_threads, metrics, overlap, checkout,
                                  args.dtype, weights or args.weights)
    try:
        return sweep(name, address, args)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for system in sorted({r["system"] for r in results}):
        rows = [r for r in results if r["system"] == system]
        xs = [r["concurrency"] for r in rows]
        left.plot(xs, [r["output_tokens_per_s"] for r in rows], marker="o", label=system)
        right.plot(xs, [r["itl_s"]["p50"] * 1e3 for r in rows], marker="o", label=f"{system} ITL p50")
        right.plot(xs, [r["ttft_s"]["p50"] * 1e3 for r in rows], marker="x", linestyle="--",
                   label=f"{system} TTFT p50")
    left.set(xlabel="concurrent streams", ylabel="output tokens / s", title="throughput", xscale="log")
    right.set(xlabel="concurrent streams", ylabel="ms", title="latency", xscale="log", yscale="log")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="benchmark a running router")
    parser.add_argument("--compare", action="store_true", help="start (a) router+2 workers and (b) local engine")
    parser.add_argument("--metrics-overhead", action="store_true",
                        help="run router+2 workers with metrics off, then on (alternating, --rounds times)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--overlap", action="store_true",
                        help="run router+2 workers with micro-batch overlap off, then on (alternating)")
    parser.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    parser.add_argument("--concurrency", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level (≥ 2×c)")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: closed loop)")
    parser.add_argument("--prompt-tokens", default="16,64", type=lambda s: tuple(int(x) for x in s.split(",")))
    parser.add_argument("--output-tokens", default="32,64", type=lambda s: tuple(int(x) for x in s.split(",")))
    parser.add_argument("--router-threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--weights", default="dense", choices=("dense", "int8"))
    parser.add_argument("--int8", action="store_true",
                        help="run router+2 workers with dense weights, then int8 (alternating, --rounds times)")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of another revision: run its local router (or --baseline-kind) beside this "
                             "tree's, alternating --rounds times, and print this / baseline throughput")
    parser.add_argument("--baseline-kind", default="local", choices=("local", "distributed"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()

    results = []
    if args.address:
        results += sweep("router", args.address, args)
    if args.compare:
        for name in ("distributed", "local"):
            results += sweep_system(name, name, args)
        by = {(r["system"], r["concurrency"]): r["output_tokens_per_s"] for r in results}
        for c in args.concurrency:
            ratio = by[("distributed", c)] / by[("local", c)]
            print(f"c={c}: distributed / local throughput = {ratio:.2f}")
    if args.metrics_overhead:
        results += ab_rounds(args, "metrics", lambda on: {"metrics": on})
    if args.overlap:
        results += ab_rounds(args, "overlap", lambda on: {"overlap": on})
    if args.int8:
        results += ab_rounds(args, "int8", lambda on: {"weights": "int8" if on else "dense"})
    if args.baseline:
        kind = args.baseline_kind
        for _ in range(args.rounds):
            results += sweep_system(f"{kind}-baseline", kind, args, checkout=args.baseline)
            results += sweep_system(kind, kind, args)
        for c in args.concurrency:
            def mean(system: str, c=c) -> float:
                return statistics.mean(r["output_tokens_per_s"] for r in results
                                       if r["system"] == system and r["concurrency"] == c)
            print(f"c={c}: {kind} this tree / baseline throughput = {mean(kind) / mean(f'{kind}-baseline'):.2f}")
    summary = {"machine": platform.platform(), "python": platform.python_version(),
               "command": " ".join(sys.argv), "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.plot:
        plot(results, args.plot)
    if not results:
        parser.error("give --address, --compare, --metrics-overhead, --overlap, --int8 or --baseline")
    print(json.dumps({"median_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in results)}))


if __name__ == "__main__":
    main()
