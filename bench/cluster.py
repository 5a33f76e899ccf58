"""Benchmark the local cluster as a user runs it: `grokserve up` → first token, recovery, throughput.

1. Wall time from launching `grokserve up` (default spec: demo model, 2 expert workers, local Ray) to the
   first token of a streamed request.
2. Recovery after SIGKILL of an expert replica under steady load: time from the kill until requests
   succeed again (Serve restarts the replica, the router picks it up from the registry).
3. Output tokens/s of the cluster at 32 concurrent streams (bench/load.py's workload).

    python bench/cluster.py [--json cluster.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import run_level, workload

from grokserve.client import Client

CLI = [sys.executable, "-m", "grokserve.cluster.cli"]
ADDRESS = "127.0.0.1:50051"


def first_token_after_up() -> dict:
    start = time.perf_counter()
    subprocess.run([*CLI, "up", "--timeout", "600"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up_done = time.perf_counter()
    with Client(ADDRESS) as client:
        for chunk in client.generate_stream("And God said", max_tokens=8, temperature=0.0):
            if chunk.token_ids:
                break
    first = time.perf_counter()
    return {"up_seconds": up_done - start, "up_to_first_token_seconds": first - start}


def registry_snapshot() -> dict:
    out = subprocess.run([*CLI, "status", "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])["shards"]


def recovery_after_kill() -> dict:
    victim = registry_snapshot()["experts-1"][0]
    results: list[tuple[float, str]] = []
    stop = threading.Event()

    def load() -> None:
        with Client(ADDRESS) as client:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    client.generate([5, 6, 7, 8], max_tokens=4, ignore_eos=True, temperature=0.0, timeout=10)
                    results.append((t0, "OK"))
                except grpc.RpcError as exc:
                    results.append((t0, exc.code().name))
                    time.sleep(0.05)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    time.sleep(2)
    killed = time.perf_counter()
    os.kill(victim["pid"], signal.SIGKILL)
    while time.perf_counter() - killed < 120:
        after = [(t, s) for t, s in results if t > killed]
        failed = [t for t, s in after if s != "OK"]
        if failed and any(s == "OK" and t > failed[-1] for t, s in after):
            break
        if not failed and len(after) > 20:
            break
        time.sleep(0.2)
    stop.set()
    thread.join()
    after = [(t, s) for t, s in results if t > killed]
    failed = [t for t, s in after if s != "OK"]
    recovered = next((t for t, s in after if s == "OK" and (not failed or t > failed[-1])), None)
    return {"failed_requests": len(failed), "requests_after_kill": len(after),
            "recovery_seconds": (recovered - killed) if recovered else None}


def throughput(concurrency: int) -> dict:
    requests = workload(max(64, 2 * concurrency), 0, (16, 64), (32, 64))
    asyncio.run(run_level(ADDRESS, requests[:4], 4, None, 0))
    return asyncio.run(run_level(ADDRESS, requests, concurrency, None, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args()
    subprocess.run([*CLI, "down"], capture_output=True)
    try:
        result = {"machine": platform.platform(), "cpus": os.cpu_count()}
        result.update(first_token_after_up())
        print(f"grokserve up → first token: {result['up_to_first_token_seconds']:.1f} s "
              f"(up itself {result['up_seconds']:.1f} s)", flush=True)
        result["throughput_32"] = throughput(32)
        print(f"32 concurrent streams: {result['throughput_32']['output_tokens_per_s']:.1f} output tokens/s, "
              f"ITL p50 {result['throughput_32']['itl_s']['p50'] * 1e3:.1f} ms", flush=True)
        result["recovery"] = recovery_after_kill()
        print(f"replica kill: recovered in {result['recovery']['recovery_seconds']} s, "
              f"{result['recovery']['failed_requests']} failed requests during the outage", flush=True)
    finally:
        subprocess.run([*CLI, "down"], capture_output=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
