"""Benchmark: weight mode int8 (model/int8.py) against dense bfloat16 and float32 weights.

layer — one Grok-1-sized expert layer (d 6144, ffn 32768, 8 experts, top-2) through `LocalExperts.compute`,
  the worker's code path, at T tokens: tokens/s per mode, measured in alternating rounds; beside each the
  bytes of expert weights the step must read (the experts its tokens use) and the bandwidth that implies,
  against this machine's read bandwidth (a sum over 1 GiB). To fit memory, the layer's 8 experts share
  `--distinct` stored experts (expert e uses the weights of e mod distinct): every expert is hundreds of MB,
  far beyond any cache, so each use of an expert still streams its bytes from DRAM.
load — a worker's load (`workers.server.load_experts`) in a fresh process: seconds, the resident bytes Info
  reports, and the peak growth of the process's resident memory while loading (VmHWM after the kernel's
  peak counter is reset), for the demo model in each mode and for one Grok-1-sized layer of random int8
  experts written to a temporary grokserve checkpoint.

    python bench/int8.py [--tokens 1,8,32] [--rounds 5] [--distinct 2] [--threads 1] [--skip-load] [--json out]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from grokserve.cluster.spec import DEMO_CHECKPOINT
from grokserve.model.config import get_preset
from grokserve.model.experts import LocalExperts
from grokserve.model.int8 import uses_kernel
from grokserve.model.weights import QuantizedTensor, expert_name

MODES = {"float32": (torch.float32, "dense"), "bfloat16": (torch.bfloat16, "dense"), "int8": (torch.bfloat16, "int8")}


# ---- layer ------------------------------------------------------------------------------------------

def random_experts(distinct: int, seed: int) -> dict[str, QuantizedTensor]:
    """Grok-1 layer 0's first `distinct` experts as the release stores them: int8 with bf16 scales (one group
    for gate/up, 8 input blocks for down)."""
    c = get_preset("grok-1")
    g = torch.Generator().manual_seed(seed)
    params = {}
    for e in range(distinct):
        for what, (out, inp, groups) in {"w_gate": (c.ffn_size, c.d_model, 1), "w_up": (c.ffn_size, c.d_model, 1),
                                         "w_down": (c.d_model, c.ffn_size, 8)}.items():
            q = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g)
            s = (torch.rand(out, groups, generator=g) * 2e-4 + 1e-4).to(torch.bfloat16)
            params[expert_name(0, e, what)] = QuantizedTensor(q, s)
    return params


def layer_in_mode(mode: str, params: dict, distinct: int) -> LocalExperts:
    """The layer in `mode`, its 8 experts mapped onto the `distinct` held ones."""
    c = get_preset("grok-1")
    dtype, weights = MODES[mode]
    experts = LocalExperts(c, {0: list(range(distinct))}, dtype, params, weights=weights)
    experts.weights[0] = [experts.weights[0][e % distinct] for e in range(c.n_experts)]
    experts.local_index[0] = np.arange(c.n_experts)
    experts.shard[0] = tuple(range(c.n_experts))
    return experts


def routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 of 8 experts per token, uniformly at random: ids [T, 2], probabilities [T, 2]."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(8, size=2, replace=False) for _ in range(tokens)])
    probs = rng.dirichlet([1.0] * 8, size=tokens)[np.arange(tokens)[:, None], ids]
    return torch.from_numpy(ids), torch.from_numpy(probs).float()


def bytes_per_expert(mode: str) -> int:
    """Expert weight bytes one use of an expert reads: bf16 mode keeps the down projection in f32 on CPU."""
    c = get_preset("grok-1")
    n = c.d_model * c.ffn_size
    scales = (2 * c.ffn_size + 8 * c.d_model) * 2
    return {"float32": 3 * n * 4, "bfloat16": n * (2 + 2 + 4), "int8": 3 * n + scales}[mode]


def read_bandwidth() -> float:
    """Bytes/s of a sum over 1 GiB of f32 (best of 3): what streaming weights from DRAM can reach here."""
    x = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return (1 << 30) / best


def bench_layer(args) -> list[dict]:
    c = get_preset("grok-1")
    params = random_experts(args.distinct, args.seed)
    layers = {mode: layer_in_mode(mode, params, args.distinct) for mode in MODES}
    del params
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()})", flush=True)
    results = []
    for tokens in args.tokens:
        ids, probs = routing(tokens, args.seed + tokens)
        used, rows = np.unique(ids.numpy(), return_counts=True)
        hidden = {mode: torch.randn(tokens, c.d_model, generator=torch.Generator().manual_seed(tokens))
                  .to(MODES[mode][0]) for mode in MODES}
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for mode, layer in layers.items():  # warm up
            layer.compute(0, hidden[mode], ids, probs)
        for _ in range(args.rounds):
            for mode, layer in layers.items():
                start = time.perf_counter()
                layer.compute(0, hidden[mode], ids, probs)
                times[mode].append(time.perf_counter() - start)
        w = layers["int8"].weights[0][0]
        kernel_uses = sum(uses_kernel(w[0], int(n), torch.device("cpu")) for n in rows)
        row = {"tokens": tokens, "experts_used": len(used), "rows_per_expert": rows.tolist(),
               "int8_kernel": f"_weight_int8pack_mm for {kernel_uses} of {len(used)} experts, dequantised slabs "
                              f"for the rest"}
        for mode in MODES:
            seconds = statistics.median(times[mode])
            read = bytes_per_expert(mode) * len(used)
            row[mode] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "weight_bytes_read": read,
                         "achieved_GBps": read / seconds / 1e9, "floor_seconds": read / bandwidth,
                         "all_seconds": times[mode]}
        best_dense = max(row["float32"]["tokens_per_s"], row["bfloat16"]["tokens_per_s"])
        row["int8_over_best_dense"] = row["int8"]["tokens_per_s"] / best_dense
        results.append(row)
        print(f"T={tokens:>3} experts used {len(used)} rows {rows.tolist()}", flush=True)
        for mode in MODES:
            r = row[mode]
            print(f"  {mode:>8}: {r['tokens_per_s']:8.2f} tok/s  {r['seconds'] * 1e3:8.1f} ms  reads "
                  f"{r['weight_bytes_read'] / 1e9:5.2f} GB → {r['achieved_GBps']:5.1f} GB/s  "
                  f"(floor {r['floor_seconds'] * 1e3:6.1f} ms)", flush=True)
        print(f"  int8 / best dense = {row['int8_over_best_dense']:.2f}   [{row['int8_kernel']}]", flush=True)
    return results


# ---- load --------------------------------------------------------------------------------------------

LOAD_CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.workers.server import WorkerSettings, load_experts

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

checkpoint, shard, weights, dtype = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
ckpt = GrokserveCheckpoint(checkpoint)
settings = WorkerSettings(checkpoint=checkpoint, shard={int(k): v for k, v in shard.items()}, dtype=dtype,
                          weights=weights)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter: VmHWM now tracks from here
before = status("VmRSS")
start = time.perf_counter()
experts = load_experts(ckpt, settings)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_before": before, "peak_rss": status("VmHWM"),
                  "rss_after": status("VmRSS"), "resident_bytes": experts.resident_bytes()}))
"""


def int8_bytes(checkpoint: Path, shard: dict[int, list[int]]) -> int:
    """The shard's bytes as stored: int8 matrices and their bf16 scales."""
    from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
    from grokserve.model.checkpoint.safetensors_reads import SafetensorsFile

    ckpt = GrokserveCheckpoint(checkpoint)
    total = 0
    for name in ckpt.expert_names(shard):
        entries = SafetensorsFile(checkpoint / ckpt.index[name]).entries
        total += sum(entries[name + suffix].nbytes for suffix in (".qweight", ".scales"))
    return total


def measure_load(checkpoint: Path, shard: dict[int, list[int]], weights: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(checkpoint), json.dumps(shard), weights, dtype],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    stored = int8_bytes(checkpoint, shard)
    result.update(weights=weights, dtype=dtype, stored_int8_bytes=stored,
                  peak_growth_over_int8=(result["peak_rss"] - result["rss_before"]) / stored)
    print(f"  {weights:>5} {dtype:>8}: {result['seconds']:6.2f} s  resident {result['resident_bytes'] / 1e6:9.1f} MB  "
          f"peak RSS growth {(result['peak_rss'] - result['rss_before']) / 1e6:9.1f} MB "
          f"= {result['peak_growth_over_int8']:.2f} × the stored int8 shard ({stored / 1e6:.1f} MB)", flush=True)
    return result


def write_grok_layer(folder: Path, seed: int) -> Path:
    """A grokserve checkpoint of Grok-1's config holding layer 0's 8 experts, random int8 (4.8 GB)."""
    from safetensors.torch import save_file

    c = get_preset("grok-1")
    (folder / "experts").mkdir(parents=True)
    tensors = {}
    for name, q in random_experts(c.n_experts, seed).items():
        tensors[name + ".qweight"], tensors[name + ".scales"] = q.weight, q.scales
    save_file(tensors, str(folder / "experts" / "layer-00000.safetensors"))
    index = {name: "experts/layer-00000.safetensors" for name in {n.rsplit(".", 1)[0] for n in tensors}}
    (folder / "index.json").write_text(json.dumps({"format": "grokserve", "version": 1, "tensors": index}))
    (folder / "config.json").write_text(c.to_json())
    return folder


def bench_load(args) -> list[dict]:
    results = []
    demo_shard = {layer: list(range(8)) for layer in range(4)}
    print("demo model, all experts of its 4 layers:", flush=True)
    for weights, dtype in (("int8", "bfloat16"), ("dense", "bfloat16"), ("dense", "float32")):
        results.append({"checkpoint": "demo", **measure_load(DEMO_CHECKPOINT, demo_shard, weights, dtype)})
    with tempfile.TemporaryDirectory(prefix="grok1-layer-") as tmp:
        # written by a child process, so that its 4.8 GB of random weights are gone before the load is measured
        here = str(Path(__file__).resolve().parent)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); from pathlib import Path; "
                        f"from int8 import write_grok_layer; write_grok_layer(Path({tmp!r}) / 'ckpt', {args.seed})"],
                       check=True)
        layer_file = Path(tmp) / "ckpt" / "experts" / "layer-00000.safetensors"
        start = time.perf_counter()
        with layer_file.open("rb") as f:  # the raw read of the file: the floor under any load of it
            while f.read(64 << 20):
                pass
        raw_read = time.perf_counter() - start
        print(f"one Grok-1-sized layer (8 random int8 experts): raw read of the file {raw_read:.2f} s", flush=True)
        results.append({"checkpoint": "grok-1 layer 0", "raw_read_seconds": raw_read,
                        **measure_load(Path(tmp) / "ckpt", {0: list(range(8))}, "int8", "bfloat16")})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--distinct", type=int, default=2, help="experts actually stored (memory: 4.8 GB each in f32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a worker's default is 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    summary: dict = {"machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
                     "command": " ".join(sys.argv)}
    if not args.skip_load:
        summary["load"] = bench_load(args)
    if not args.skip_layer:
        summary["layer"] = bench_layer(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
