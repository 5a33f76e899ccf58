"""Shared test fixtures: the official tiny Grok-1 in tests/data, a loaded reference engine, and real
worker processes. Every file a test reads lives in the repository (tests/data/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from procs import WorkerProc

pytest_plugins = ["no_skips", "pytester"]

DATA = Path(__file__).resolve().parent / "data"
VECTORS = DATA / "grok1-tiny"
OFFICIAL_TOKENIZER_GZ = DATA / "grok1-tokenizer.model.gz"  # gzip of xai-org/grok-1 tokenizer.model
OFFICIAL_TOKENIZER_SHA256 = "5c69d7cbad192fa2c9d14e2a77fbfdc11597c68907b043ddb0260e3d28eddd7f"


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The official tiny Grok-1: checkpoint, config, logits and greedy continuations from xAI's code."""
    return VECTORS


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
def official_tokenizer(tmp_path_factory):
    """xAI's Grok-1 tokenizer, unpacked byte for byte (its SHA-256 is checked)."""
    import gzip
    import hashlib

    from grokserve.model.tokenizer import Tokenizer

    raw = gzip.decompress(OFFICIAL_TOKENIZER_GZ.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == OFFICIAL_TOKENIZER_SHA256
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    path.write_bytes(raw)
    return Tokenizer(path)


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
