"""Shared test fixtures: where ../shared lives, the official tiny vectors, a loaded reference engine, and
real worker processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from procs import WorkerProc

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
def prompts(vectors) -> list[list[int]]:
    """The three prompts (1, 7 and 33 tokens) of the official greedy vectors."""
    import json

    return json.loads((vectors / "greedy.json").read_text())["prompts"]


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
