"""bench/gpu.py is ready for a GPU machine: its --small mode runs the same code paths on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_small_mode_runs_and_reports_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--small", "--device", "cpu",
                             "--json", str(out)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["copy"]["bytes_per_s"] > 0 and report["matmul"]["flops_per_s"] > 0
    assert [r["tokens"] for r in report["expert_ffn"]] == [1, 8, 32]
    assert all(r["seconds"] > 0 and r["roofline_seconds"] > 0 for r in report["expert_ffn"])
    assert report["dispatch_hop"]["pinned_seconds"] > 0
    assert report["decode"]["tokens_per_s"] > 0
    assert "expert FFN" in result.stdout
