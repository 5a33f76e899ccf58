"""Ray for the `grokserve` CLI: start a local head (or join one), deploy the app, report, and tear down.

`up` starts a local Ray head in the background (unless --address joins an existing cluster) and deploys
detached; `status` and `down` find it again through a small state file. `demo` does all of it in one
process: embedded Ray, deploy, one streamed request, shut down.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

STATE_FILE = Path(os.environ.get("GROKSERVE_STATE", Path.home() / ".grokserve" / "cluster.json"))
DEFAULT_RAY_PORT = 6380


def loopback_env() -> None:
    """Keep a local Ray on loopback, without usage stats, under one temp dir: Ray binds a routable address
    unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before it is imported (docs/architecture.md)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-grokserve")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def quiet_ray_logs() -> None:
    """The CLI speaks for itself: Ray's and Serve's INFO chatter on the driver is dropped (warnings stay)."""
    import logging

    import ray.serve  # noqa: F401  (Serve sets its logger's level when first imported: import it, then lower it)

    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _ray_cli() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def start_local_head(port: int = DEFAULT_RAY_PORT, num_cpus: int | None = None) -> dict:
    """Start a Ray head of our own, in a temp dir of its own; returns what `stop_local_head` needs to stop
    exactly it: the address, the session directory and the PIDs of its processes."""
    loopback_env()
    temp_dir = Path(os.environ["RAY_TMPDIR"]) / f"head-{port}"
    args = [_ray_cli(), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed: {result.stderr.strip()[-2000:]}")
    session_dir = str((temp_dir / "session_latest").resolve())
    return {"address": f"127.0.0.1:{port}", "session_dir": session_dir,
            "pids": [[p.pid, p.create_time()] for p in _session_processes(session_dir)]}


def _session_processes(session_dir: str) -> list[psutil.Process]:
    """The Ray system processes of one head (gcs, raylet, monitors...): their command lines name its session
    directory, which no other Ray cluster shares."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(session_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
    return found


def stop_local_head(head: dict, timeout: float = 15.0) -> int:
    """Stop the Ray head `start_local_head` started — its system processes and their children (Ray workers,
    Serve replicas) — and nothing else. Returns how many processes were stopped."""
    procs: dict[int, psutil.Process] = {}
    for pid, created in head.get("pids", []):
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1e-3:  # the same process, not a reused PID
                procs[pid] = proc
    if head.get("session_dir"):
        procs.update({p.pid: p for p in _session_processes(head["session_dir"])})
    for proc in list(procs.values()):
        with contextlib.suppress(psutil.Error):
            procs.update({child.pid: child for child in proc.children(recursive=True)})
    procs.pop(os.getpid(), None)
    for proc in procs.values():
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def save_state(state: dict) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps(state, indent=1))


def load_state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def connect(address: str) -> None:
    """Join a Ray cluster. A loopback head needs the loopback environment *before* ray is imported (Ray reads
    it at import time); otherwise the driver rewrites 127.0.0.1 to the machine's routable address."""
    if address.split(":")[0] in ("127.0.0.1", "localhost"):
        loopback_env()
    import ray

    ray.init(address=address, namespace="grokserve", log_to_driver=False, ignore_reinit_error=True)


def local_cpus(spec) -> int:
    """Logical CPUs for a Ray that grokserve starts itself: at least what the spec asks for, so the default
    spec (router + 2 workers at 1 CPU each) also runs on a 2-core laptop (Ray CPUs are scheduling tokens)."""
    from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint

    config = GrokserveCheckpoint(spec.model.checkpoint_path()).config
    return max(os.cpu_count() or 1, math.ceil(spec.required_resources(config).get("CPU", 0)))


def check_resources(spec) -> None:
    """Refuse to deploy what the cluster cannot place (Serve would wait forever), naming what is short."""
    import ray

    from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint

    config = GrokserveCheckpoint(spec.model.checkpoint_path()).config
    available = ray.cluster_resources()
    short = {k: (v, available.get(k, 0.0)) for k, v in spec.required_resources(config).items()
             if v > available.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{k}: needs {need:g}, cluster has {have:g}" for k, (need, have) in short.items())
        raise RuntimeError(f"the cluster cannot place '{spec.name}' ({detail}); lower ray_actor_options in the "
                           "spec or add nodes")


def deploy(spec, blocking_timeout: float, progress=None) -> dict:
    """Deploy the spec's application (Serve without an HTTP proxy: clients use the router's gRPC port) and
    wait, at most `blocking_timeout` seconds, until it serves."""
    from ray import serve

    from grokserve.cluster.app import build_app, wait_until_ready

    check_resources(spec)
    serve.start(proxy_location="Disabled")
    deadline = time.monotonic() + blocking_timeout
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(build_app(spec), name=spec.name, route_prefix=None, blocking=False)
        except BaseException as exc:  # reported below
            failure.append(exc)

    runner = threading.Thread(target=run, daemon=True, name="serve-run")
    runner.start()
    runner.join(timeout=blocking_timeout)
    if failure:
        raise RuntimeError(f"deploying '{spec.name}' failed: {failure[0]}") from failure[0]
    if runner.is_alive():
        raise TimeoutError(f"'{spec.name}' was not deployed within {blocking_timeout:.0f}s (see `grokserve status`)")
    return wait_until_ready(spec, max(1.0, deadline - time.monotonic()), progress)


def teardown(app_name: str | None = None) -> None:
    """Delete one application (or, with None, shut Serve down); the registry goes with the last application."""
    import ray
    from ray import serve

    from grokserve.cluster.registry import REGISTRY_NAME, REGISTRY_NAMESPACE

    if app_name:
        serve.delete(app_name)
    else:
        serve.shutdown()
    if app_name and serve.status().applications:
        return  # other applications (maybe other grokserve clusters) still use the registry
    with contextlib.suppress(ValueError):  # no registry: nothing was deployed
        ray.kill(ray.get_actor(REGISTRY_NAME, namespace=REGISTRY_NAMESPACE))


def describe(app_name: str) -> dict:
    """Shards, replicas, nodes, health and load of a running application."""
    import ray
    from ray import serve

    from grokserve.cluster.app import REGISTRY_TTL_S
    from grokserve.cluster.registry import get_registry

    status = serve.status()
    app = status.applications.get(app_name)
    deployments = {}
    if app is not None:
        for name, dep in app.deployments.items():
            deployments[name] = {"status": str(dep.status.value if hasattr(dep.status, "value") else dep.status),
                                 "replicas": {str(k.value if hasattr(k, "value") else k): v
                                              for k, v in dep.replica_states.items()}}
    registry = ray.get(get_registry().snapshot.remote(REGISTRY_TTL_S), timeout=10)
    nodes = {n["NodeID"]: {"alive": n["Alive"], "address": n["NodeManagerAddress"],
                           "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}}
             for n in ray.nodes()}
    router = None
    try:
        router = serve.get_deployment_handle("router", app_name=app_name).stats.remote().result(timeout_s=10)
    except Exception as exc:
        router = {"error": str(exc)}
    return {"app": app_name, "app_status": str(app.status.value) if app else "NOT_DEPLOYED",
            "deployments": deployments, "shards": registry, "nodes": nodes, "router": router,
            "checked_at": time.strftime("%Y-%m-%d %H:%M:%S")}
