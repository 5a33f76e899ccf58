"""Helpers that start real grokserve processes for tests (importable from any test module)."""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from grokserve.model.checkpoint import read_checkpoint
from grokserve.router.assembly import build_router, discover_plan
from grokserve.router.http_api import HttpApi, start_http_server, stop_http_server
from grokserve.router.service import GenerationService, start_router_server
from grokserve.router.settings import DispatchSettings, EngineLimits
from grokserve.transport.metrics_server import serve_metrics


class WorkerProc:
    """A real `grokserve worker` process on loopback."""

    def __init__(self, checkpoint: Path, layers: str, experts: str, extra: tuple[str, ...] = ()):
        import subprocess
        import sys

        self.args = [sys.executable, "-m", "grokserve.cluster.cli", "worker", "--checkpoint", str(checkpoint),
                     "--layers", layers, "--experts", experts, "--port", "0", "--threads", "1", *extra]
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.address = ""

    def wait_serving(self, timeout: float = 90.0) -> WorkerProc:
        import queue
        import threading

        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        try:
            while True:
                line = lines.get(timeout=timeout)
                if "SERVING on" in line:
                    self.address = line.split("SERVING on ")[1].split()[0]
                    self.serving_line = line
                    return self
        except queue.Empty:
            pass
        self.kill()
        raise RuntimeError(f"worker did not become SERVING within {timeout}s: {' '.join(self.args)}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class RouterHarness:
    """A router (service + engine) running in this process, on the engine's event loop thread."""

    def __init__(self, checkpoint, workers: list[str] | None = None, limits: EngineLimits | None = None,
                 metrics: bool = False, tls=None, tokens=None, dispatch_tls=None,
                 dispatch: DispatchSettings | None = None, http: bool = False, chat_template=None):
        plan = endpoints = None
        if workers:
            config = read_checkpoint(checkpoint, "grokserve").config
            plan, endpoints = discover_plan(workers, config, tls=dispatch_tls)
        self.router = build_router(checkpoint, plan=plan, endpoints=endpoints,
                                   limits=limits or EngineLimits(kv_cache_mb=4),
                                   dispatch=dispatch or DispatchSettings(deadline_s=3.0), dispatch_tls=dispatch_tls)
        self.metrics_port = serve_metrics(self.router.metrics.registry, "127.0.0.1", 0) if metrics else None
        service = GenerationService(self.router.engine, self.router.tokenizer, self.router.model_id)
        self.thread = self.router.loop  # the client API runs on the engine's loop, as in `grokserve router`
        self.server, self.port = self.thread.run(start_router_server(service, "127.0.0.1", 0, tls, tokens))
        self.address = f"127.0.0.1:{self.port}"
        self.http = None
        if http:  # the OpenAI-compatible HTTP API on the same loop, as `grokserve router --http-port`
            api = HttpApi(service, tokens, chat_template)
            server, http_port, task = self.thread.run(start_http_server(api, "127.0.0.1", 0, tls))
            self.http = (server, task)
            self.http_url = f"{'https' if tls else 'http'}://127.0.0.1:{http_port}"

    @property
    def engine(self):
        return self.router.engine

    def idle(self, timeout: float = 5.0) -> dict:
        """Wait until nothing runs or waits; return the engine's load."""
        deadline = time.monotonic() + timeout
        while True:
            load = self.engine.load()
            if (load["running"] == 0 and load["waiting"] == 0) or time.monotonic() > deadline:
                return load
            time.sleep(0.05)

    def close(self) -> None:
        if self.http is not None:
            self.thread.run(stop_http_server(*self.http))
        self.thread.run(self.server.stop(grace=1))
        self.router.shutdown()


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    """sample name → [(labels, value)], from a real HTTP GET of /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, list[tuple[dict, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples, name: str, **labels) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == str(x) for k, x in labels.items()))
