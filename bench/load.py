"""Load generator for grokserve's Generation API: concurrent streams or Poisson arrivals.

Reports output tokens/s and p50/p90/p99 of time to first token, inter-token latency and end-to-end
latency as JSON, and plots a concurrency sweep. `--compare` runs, in one invocation and with the same
workload, (a) a router with two expert workers and (b) the single-process engine (the router with its
experts in process) behind the same API, and prints (a)/(b) throughput.

    python bench/load.py --address 127.0.0.1:50051 --concurrency 1,8,32
    python bench/load.py --compare --concurrency 1,4,16,32 --json load.json --plot load.png
    python bench/load.py --int8 --dtype bfloat16 --concurrency 32   # router + 2 workers: int8 vs dense weights
    python bench/load.py --api http --address http://127.0.0.1:8000   # through /v1/completions (streaming)
    python bench/load.py --http-vs-grpc --concurrency 1,16,32          # one router + 2 workers, both APIs alternating
    python bench/load.py --prefix-cache --shared-prefix 384 --concurrency 32   # prefix cache off vs on
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
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


@functools.cache
def heldout_ids() -> list[int]:
    """The demo's held-out text as token ids (the source of every benchmark prompt)."""
    from grokserve.model.tokenizer import Tokenizer

    return Tokenizer(DEMO_CHECKPOINT / "tokenizer.model").encode((DEMO_CHECKPOINT / "heldout.txt").read_text())


def workload(n: int, seed: int, prompt_tokens: tuple[int, int], output_tokens: tuple[int, int]):
    """Prompt token ids cut from the demo's held-out text, lengths uniform in the given ranges."""
    ids = heldout_ids()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(*prompt_tokens)
        start = rng.randint(0, len(ids) - length - 1)
        out.append((ids[start:start + length], rng.randint(*output_tokens)))
    return out


def shared_prefix_workload(n: int, seed: int, preamble: int, tail: int, output_tokens: tuple[int, int]):
    """Prompts that share their first `preamble` tokens (a system prompt), then `tail` tokens of their own."""
    ids = heldout_ids()
    rng = random.Random(seed)
    shared = ids[:preamble]
    out = []
    for _ in range(n):
        start = rng.randint(preamble, len(ids) - tail - 1)
        out.append((shared + ids[start:start + tail], rng.randint(*output_tokens)))
    return out


async def grpc_stream(client: AsyncClient, prompt: list[int], max_tokens: int):
    """Token counts of each streamed message, through the gRPC API."""
    async for chunk in client.generate_stream(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        yield len(chunk.token_ids)


async def http_stream(client, model: str, prompt: list[int], max_tokens: int):
    """Token counts of each server-sent event, through the OpenAI-compatible /v1/completions (one token per
    event; the last may carry none)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield 1 if json.loads(line[len("data: "):])["choices"][0]["text"] is not None else 0


async def run_level(address: str, requests: list, concurrency: int, rate: float | None, seed: int,
                    api: str = "grpc") -> dict:
    ttft, itl, e2e, tokens, errors = [], [], [], 0, 0
    semaphore = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)

    async with contextlib.AsyncExitStack() as stack:
        if api == "http":
            import httpx

            client = await stack.enter_async_context(httpx.AsyncClient(  # httpx: what the openai SDK uses
                base_url=address, timeout=300, limits=httpx.Limits(max_connections=concurrency + 4)))
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            stream = functools.partial(http_stream, client, model)
        else:
            stream = functools.partial(grpc_stream, await stack.enter_async_context(AsyncClient(address, timeout=300)))

        async def one(prompt, max_tokens):
            nonlocal tokens, errors
            async with semaphore:
                start = last = time.perf_counter()
                first = True
                try:
                    async for count in stream(prompt, max_tokens):
                        now = time.perf_counter()
                        if count:
                            if first:
                                ttft.append(now - start)
                                first = False
                            else:
                                itl.append(now - last)
                            last = now
                            tokens += count
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
    return {"api": api, "concurrency": concurrency, "rate": rate, "requests": len(requests), "errors": errors,
            "output_tokens": tokens, "seconds": wall, "output_tokens_per_s": tokens / wall,
            "ttft_s": percentiles(ttft), "itl_s": percentiles(itl), "e2e_s": percentiles(e2e)}


def start_process(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a grokserve process; its address (gRPC, and for a router with HTTP on, `grpc|http://host:port`)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:
        if "SERVING on" in line:
            address = line.split("SERVING on ")[1].split()[0]
            if "OpenAI HTTP API " in line:
                address += "|" + line.split("OpenAI HTTP API ")[1].split()[0].rstrip(")").removesuffix("/v1")
            return proc, address
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
                 checkout: Path | None = None, dtype: str = "float32", weights: str = "dense", http: bool = False,
                 prefix_cache: bool = True) -> tuple[list[subprocess.Popen], str]:
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
                   *metrics_args, *(["--micro-batch-overlap"] if overlap else []),
                   *(["--http-port", "0"] if http else ["--http-port", "-1"] if checkout is None else []),
                   *([] if prefix_cache else ["--no-prefix-cache"])]
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


def sweep(name: str, address: str, args, api: str = "grpc") -> list[dict]:
    results = []
    for concurrency in args.concurrency:
        n = concurrency if args.one_wave else max(args.requests, 2 * concurrency)
        requests = workload(max(n, 4), args.seed, args.prompt_tokens, args.output_tokens)
        # warm up with prompts unrelated to a shared preamble: a cached preamble is part of what is measured
        asyncio.run(run_level(address, requests[: min(4, n)], min(concurrency, 4), None, args.seed + 1, api))
        requests = requests[:n]
        if args.shared_prefix:
            requests = shared_prefix_workload(n, args.seed, args.shared_prefix, args.shared_tail, args.output_tokens)
            if args.warm_prefix:  # the preamble was seen before (a system prompt in steady state): one request
                warm = shared_prefix_workload(1, args.seed + 1, args.shared_prefix, args.shared_tail, (1, 1))
                asyncio.run(run_level(address, warm, 1, None, args.seed, api))
        result = asyncio.run(run_level(address, requests, concurrency, args.rate, args.seed, api))
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
        def ttft(state: str, c=c) -> float:
            return statistics.mean(r["ttft_s"]["p50"] for r in results
                                   if r["system"] == f"{label}-{state}" and r["concurrency"] == c)
        print(f"c={c}: {label} on / off throughput = {mean('on') / mean('off'):.3f}, "
              f"TTFT p50 on / off = {ttft('on') / ttft('off'):.3f}")
    return results


def sweep_system(name: str, kind: str, args, metrics: bool = False, overlap: bool = False,
                 checkout: Path | None = None, weights: str | None = None, prefix_cache: bool = True) -> list[dict]:
    """Start a system, sweep it, stop it."""
    procs, address = start_system(kind, Path(args.checkpoint), args.router_threads, metrics, overlap, checkout,
                                  args.dtype, weights or args.weights, prefix_cache=prefix_cache)
    try:
        return sweep(name, address, args)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def http_vs_grpc(args) -> list[dict]:
    """One router + 2 workers serving both APIs; each concurrency level through gRPC, then HTTP, --rounds times."""
    procs, addresses = start_system("distributed", Path(args.checkpoint), args.router_threads, dtype=args.dtype,
                                    weights=args.weights, http=True)
    grpc_address, http_address = addresses.split("|")
    results = []
    try:
        for _ in range(args.rounds):
            results += sweep("grpc", grpc_address, args, "grpc")
            results += sweep("http", http_address, args, "http")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    for c in args.concurrency:
        def mean(api: str, c=c) -> float:
            return statistics.mean(r["output_tokens_per_s"] for r in results
                                   if r["system"] == api and r["concurrency"] == c)
        print(f"c={c}: http / grpc throughput = {mean('http') / mean('grpc'):.3f}")
    return results


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
    parser.add_argument("--address", help="benchmark a running router (gRPC host:port, or with --api http its "
                                          "HTTP base URL)")
    parser.add_argument("--api", default="grpc", choices=("grpc", "http"), help="the API --address speaks")
    parser.add_argument("--http-vs-grpc", action="store_true",
                        help="one router + 2 workers: the same workload through gRPC and HTTP, alternating")
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
    parser.add_argument("--prefix-cache", action="store_true",
                        help="run router+2 workers with the prefix cache off, then on (alternating, --rounds times)")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="measured prompts share this many leading tokens, then --shared-tail tokens of their own")
    parser.add_argument("--shared-tail", type=int, default=32)
    parser.add_argument("--one-wave", action="store_true",
                        help="exactly --concurrency requests, all at once (default: ≥ 2 × concurrency, closed loop)")
    parser.add_argument("--warm-prefix", action="store_true",
                        help="send one request with the shared preamble before measuring (steady state)")
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
        results += sweep("router", args.address, args, args.api)
    if args.http_vs_grpc:
        results += http_vs_grpc(args)
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
    if args.prefix_cache:
        results += ab_rounds(args, "prefix-cache", lambda on: {"prefix_cache": on})
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
        parser.error("give --address, --compare, --http-vs-grpc, --metrics-overhead, --overlap, --int8, "
                     "--prefix-cache or --baseline")
    print(json.dumps({"median_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in results)}))


if __name__ == "__main__":
    main()
