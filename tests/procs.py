"""Helpers that start real grokserve processes for tests (importable from any test module)."""

from __future__ import annotations

from pathlib import Path


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
                    return self
        except queue.Empty:
            pass
        self.kill()
        raise RuntimeError(f"worker did not become SERVING within {timeout}s: {' '.join(self.args)}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
