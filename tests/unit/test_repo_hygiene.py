"""The committed generated gRPC code is what the .proto files produce, and the tree is ruff-clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_generated_grpc_code_is_up_to_date(tmp_path):
    subprocess.run(["bash", str(REPO / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, cwd=REPO,
                   env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert generated, "protoc produced nothing"
    for rel in generated:
        committed = REPO / "proto" / rel
        assert committed.exists(), f"{rel} is not committed; run scripts/gen_proto.sh"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), f"{rel} is stale; run scripts/gen_proto.sh"


def test_tree_is_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed (it is part of the [test] extra)")
    result = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:]
