"""`grokserve up` / `down` as a user runs them: down stops exactly the Ray head that up started."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil

from grokserve.client import Client
from grokserve.cluster.session import stop_local_head

CLI = [sys.executable, "-m", "grokserve.cluster.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(session_dir: str) -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        if any(session_dir in part for part in proc.info["cmdline"] or ()):
            pids.add(proc.pid)
    return pids


def test_up_and_down_leave_an_unrelated_ray_head_alone():
    # Ray's unix socket paths must stay under 107 bytes: a short folder of our own under /tmp
    tmp_path = Path(tempfile.mkdtemp(prefix="gs-", dir="/tmp"))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(tmp_path / "ray"), "GROKSERVE_STATE": str(tmp_path / "state.json")}
    ray = str(Path(sys.executable).parent / "ray")
    other_port, other_dir = _free_port(), tmp_path / "other"
    subprocess.run([ray, "start", "--head", f"--port={other_port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={other_dir}",
                    "--num-cpus=1"], check=True, capture_output=True, env=env, timeout=120)
    other_session = str((other_dir / "session_latest").resolve())
    other_pids = _session_pids(other_session)
    try:
        assert len(other_pids) >= 3  # gcs, raylet, monitors
        spec = tmp_path / "spec.yaml"
        grpc_port, http_port = _free_port(), _free_port()
        spec.write_text(f"router:\n  grpc_port: {grpc_port}\n  http_port: {http_port}\n")
        up = subprocess.run([*CLI, "up", str(spec), "--ray-port", str(_free_port()), "--timeout", "300"],
                            capture_output=True, text=True, env=env, timeout=400)
        assert up.returncode == 0, up.stderr[-3000:]
        assert f"OpenAI-compatible HTTP API at http://127.0.0.1:{http_port}/v1" in up.stdout, up.stdout
        with Client(f"127.0.0.1:{grpc_port}", timeout=60) as client:
            assert client.generate("And God said", max_tokens=4, temperature=0.0).usage.completion_tokens == 4
        body = json.dumps({"model": "grokserve-demo", "prompt": "And God said", "max_tokens": 4}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", body,
                                         {"content-type": "application/json"})
        assert json.load(urllib.request.urlopen(request, timeout=60))["usage"]["completion_tokens"] == 4
        down = subprocess.run([*CLI, "down"], capture_output=True, text=True, env=env, timeout=120)
        assert down.returncode == 0 and "local Ray head" in down.stdout, down.stdout + down.stderr[-2000:]
        assert "Traceback" not in down.stderr and "failed" not in down.stderr + down.stdout, down.stderr[-2000:]
        # ours is gone: nothing answers on its gRPC port, no process of its session is left
        for port in (grpc_port, http_port):
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0
        ours = [p for p in (tmp_path / "ray").iterdir() if p.name.startswith("head-")]
        assert ours and not _session_pids(str((ours[0] / "session_latest").resolve()))
        # the unrelated head is untouched and still answers
        assert {p for p in other_pids if psutil.pid_exists(p)} == other_pids
        status = subprocess.run([ray, "status", f"--address=127.0.0.1:{other_port}"], capture_output=True,
                                text=True, env=env, timeout=60)
        assert status.returncode == 0 and "node_" in status.stdout
    finally:
        stop_local_head({"session_dir": other_session})
        shutil.rmtree(tmp_path, ignore_errors=True)
