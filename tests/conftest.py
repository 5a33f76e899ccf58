"""Shared test fixtures: where ../shared lives, the official tiny vectors, and a loaded reference engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GROKSERVE_SHARED", REPO.parent / "shared"))
VECTORS = SHARED / "grok1" / "vectors"
OFFICIAL_TOKENIZER = SHARED / "grok1" / "tokenizer.model"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared reference files (../shared beside the repo) are needed")
    return path


@pytest.fixture(scope="session")
def vectors() -> Path:
    return require_shared(VECTORS)


@pytest.fixture(scope="session")
def tiny_config(vectors):
    from grokserve.model.config import GrokConfig

    return GrokConfig.from_json_file(vectors / "config.json")


@pytest.fixture(scope="session")
def tiny_checkpoint(vectors):
    from grokserve.model.checkpoint import read_checkpoint

    return read_checkpoint(vectors / "ckpt", "official", vectors / "config.json")


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from grokserve.model.engine import ReferenceEngine

    return ReferenceEngine.from_loaded(tiny_checkpoint, "float32")


@pytest.fixture(scope="session")
def official_tokenizer():
    from grokserve.model.tokenizer import Tokenizer

    return Tokenizer(require_shared(OFFICIAL_TOKENIZER))


@pytest.fixture(scope="session")
def tiny_grokserve_ckpt(vectors, tmp_path_factory) -> Path:
    """The official tiny vectors converted to grokserve's layout (what workers and routers load)."""
    from grokserve.cluster.cli import main as cli

    out = tmp_path_factory.mktemp("tiny-grokserve")
    assert cli(["convert", "--checkpoint", str(vectors / "ckpt"), "--format", "official",
                "--config", str(vectors / "config.json"), "--output", str(out)]) == 0
    return out


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


@pytest.fixture
def spawn_worker():
    """Factory: start real worker processes; all are killed at the end of the test."""
    started: list[WorkerProc] = []

    def spawn(checkpoint: Path, layers: str = "all", experts: str = "0-7", extra: tuple[str, ...] = ()
              ) -> WorkerProc:
        proc = WorkerProc(checkpoint, layers, experts, extra)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.kill()
