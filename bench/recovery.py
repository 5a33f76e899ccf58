"""Benchmark: how fast a router serves again when a dead expert worker comes back on the same address.

Router + 2 expert workers as separate processes (demo model); a client thread sends requests back to
back. One worker is SIGKILLed, stays down for `--outage` seconds, and is restarted on the same port. We
report the time from the restarted worker's SERVING line to the router's first successful request, and
how many requests failed during the outage (each must fail fast, UNAVAILABLE).

    python bench/recovery.py [--outages 5,15] [--rounds 2] [--json recovery.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import start_process

from grokserve.client import Client
from grokserve.cluster.spec import DEMO_CHECKPOINT

CLI = [sys.executable, "-m", "grokserve.cluster.cli"]


def worker(experts: str, port: int = 0) -> tuple[subprocess.Popen, str]:
    return start_process([*CLI, "worker", "--checkpoint", str(DEMO_CHECKPOINT), "--experts", experts,
                          "--threads", "1", "--port", str(port)])


class Load:
    """Back-to-back requests; (start, end, status) of each."""

    def __init__(self, address: str):
        self.results: list[tuple[float, float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(address,), daemon=True)
        self.thread.start()

    def _run(self, address: str) -> None:
        with Client(address) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    client.generate("And God said", max_tokens=2, temperature=0.0, timeout=5)
                    status = "OK"
                except grpc.RpcError as exc:
                    status = exc.code().name
                self.results.append((start, time.monotonic(), status))

    def first_success_after(self, t: float, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ok = [end for start, end, status in list(self.results) if start >= t and status == "OK"]
            if ok:
                return ok[0]
            time.sleep(0.01)
        raise TimeoutError("no success after the worker returned")


def one_round(outage: float) -> dict:
    procs = []
    try:
        a, a_addr = worker("0-3")
        b, b_addr = worker("4-7")
        procs += [a, b]
        router, r_addr = start_process([*CLI, "router", "--checkpoint", str(DEMO_CHECKPOINT), "--port", "0",
                                        "--http-port", "-1", "--workers", f"{a_addr},{b_addr}", "--threads", "1"])
        procs.append(router)
        load = Load(r_addr)
        time.sleep(1.0)
        port = int(b_addr.rsplit(":", 1)[1])
        b.kill()
        b.wait()
        killed = time.monotonic()
        time.sleep(outage)
        b2, _ = worker("4-7", port)  # returns when the worker prints its SERVING line
        serving = time.monotonic()
        procs.append(b2)
        first = load.first_success_after(serving)
        load.stop.set()
        load.thread.join(timeout=10)
        during = [(s, e, st) for s, e, st in load.results if killed <= s < serving]
        return {"outage_s": outage, "serving_to_first_success_s": first - serving,
                "failed_during_outage": sum(st != "OK" for _, _, st in during),
                "slowest_failure_s": max((e - s for s, e, st in during if st != "OK"), default=0.0),
                "failure_codes": sorted({st for _, _, st in during if st != "OK"})}
    finally:
        for proc in procs:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outages", default="5,15", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for outage in args.outages:
        for _ in range(args.rounds):
            row = one_round(outage)
            rows.append(row)
            codes = ", ".join(row["failure_codes"])
            print(f"outage {outage:5.1f} s: first success {row['serving_to_first_success_s']:.2f} s after SERVING; "
                  f"{row['failed_during_outage']} requests failed during the outage ({codes}), "
                  f"slowest failure {row['slowest_failure_s'] * 1e3:.0f} ms", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
