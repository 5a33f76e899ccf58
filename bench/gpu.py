"""GPU benchmark: device copy bandwidth and bf16 matmul rate, then (a) one Grok-1-sized MoE layer's expert
FFN against its roofline, (b) a dispatch hop with host staging, (c) decode steps of a reduced-depth
Grok-1-width model through router + expert worker on the same device. Prints a table, writes JSON.

Sized to finish in under 6 minutes on one H100/H200. `--small` shrinks every size so the same code runs
on a CPU in seconds (that is how CI tests it).

    python bench/gpu.py --json gpu.json            # on a GPU machine
    python bench/gpu.py --small --json gpu.json    # anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from grokserve.model.config import GrokConfig, get_preset
from grokserve.model.experts import LocalExperts
from grokserve.model.random_init import random_params
from grokserve.transport import wire

sys.path.insert(0, str(Path(__file__).resolve().parent))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeat: int) -> dict:
    """Host→device with pinned memory (on CPU: a memcpy). Bytes/s."""
    pin = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    seconds = timed(lambda: dst.copy_(src, non_blocking=pin), device, repeat)
    return {"bytes": nbytes, "seconds": seconds, "bytes_per_s": nbytes / seconds}


def matmul_rate(device: torch.device, n: int, repeat: int) -> dict:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = timed(lambda: a @ b, device, repeat)
    return {"n": n, "seconds": seconds, "flops_per_s": 2 * n**3 / seconds}


def moe_layer_config(small: bool) -> GrokConfig:
    grok = get_preset("grok-1")
    if small:
        return get_preset("test-small").model_copy(update={"n_layers": 1, "name": "moe-small"})
    return grok.model_copy(update={"n_layers": 1, "vocab_size": 256, "name": "grok-1-moe-layer"})


def expert_ffn_vs_roofline(device: torch.device, config: GrokConfig, token_counts: list[int], bandwidth: float,
                           peak: float, repeat: int) -> list[dict]:
    """One MoE layer (all experts resident, top-2 random routing) vs max(bytes/bandwidth, flops/peak)."""
    params = {name: t for name, t in random_params(config, dtype=torch.bfloat16) if ".experts." in name}
    experts = LocalExperts(config, {0: list(range(config.n_experts))}, torch.bfloat16, params, device)
    del params
    d, f = config.d_model, config.ffn_size
    rows = []
    for tokens in token_counts:
        hidden = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(config.n_experts)[:2] for _ in range(tokens)]).to(device)
        probs = torch.rand(tokens, 2, device=device)
        used = int(torch.unique(ids).numel())
        weight_bytes = used * 3 * d * f * 2
        flops = 2 * 3 * d * f * tokens * 2  # two experts per token, three matmuls each
        seconds = timed(lambda: experts.compute(0, hidden, ids, probs), device, repeat)  # noqa: B023
        roofline = max((weight_bytes + 2 * tokens * d * 2) / bandwidth, flops / peak)
        rows.append({"tokens": tokens, "experts_touched": used, "seconds": seconds, "roofline_seconds": roofline,
                     "over_roofline": seconds / roofline, "tflops": flops / seconds / 1e12})
    return rows


def dispatch_hop(device: torch.device, config: GrokConfig, tokens: int, repeat: int) -> dict:
    """Device → host staging → wire bytes → host → device for one hop of [tokens, 2, D] bf16 rows, with
    pageable vs pinned staging (the copies on both sides of every gRPC hop)."""
    rows = torch.randn(tokens * 2, config.d_model, device=device, dtype=torch.bfloat16)
    result = {"tokens": tokens, "bytes": rows.numel() * 2}
    for mode in ("pageable", "pinned"):
        pin = mode == "pinned" and device.type == "cuda"
        staging = torch.empty(rows.shape, dtype=torch.bfloat16, pin_memory=pin)
        back = torch.empty(rows.shape, dtype=torch.bfloat16, pin_memory=pin)

        def hop(staging=staging, back=back, pin=pin) -> None:
            staging.copy_(rows, non_blocking=pin)
            sync(device)
            payload = wire.encode_response_bytes(1, wire.DTYPE_TO_WIRE[torch.bfloat16], staging, 0.0)
            view = wire.decode_response_bytes(payload)
            back.copy_(wire.decode_partial(view, rows.shape[0], rows.shape[1], torch.bfloat16))
            rows.copy_(back, non_blocking=pin)

        result[f"{mode}_seconds"] = timed(hop, device, repeat)
    return result


def decode_through_router(device: str, small: bool, steps: int, batch: int) -> dict:
    """Reduced-depth Grok-1-width model: router (this process) + one expert worker process, same device."""
    from load import start_process

    from grokserve.model.checkpoint.grokserve_format import write_checkpoint
    from grokserve.router.assembly import build_router, discover_plan

    base = get_preset("test-small") if small else get_preset("grok-1")
    config = base.model_copy(update={"n_layers": 2, "vocab_size": 1024, "name": "grok-1-width-2-layers"})
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, config, random_params(config, dtype=torch.bfloat16))
        proc, address = start_process([sys.executable, "-m", "grokserve.cluster.cli", "worker", "--checkpoint", tmp,
                                       "--experts", "0-7", "--dtype", "bfloat16", "--device", device])
        try:
            plan, endpoints = discover_plan([address], config)
            router = build_router(tmp, "bfloat16", device, plan, endpoints)
            from grokserve.model.batch import padded_batch
            from grokserve.model.kv_cache import ContiguousKVCache

            model = router.engine.model
            cache = ContiguousKVCache(config, batch, steps + 1, torch.bfloat16, device)
            rows = torch.arange(batch, device=device)
            tokens = torch.randint(1, config.vocab_size, (batch, 1), device=device)
            valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
            times = []
            for position in range(steps):
                start = time.perf_counter()
                inputs = padded_batch(tokens, torch.full((batch, 1), position, device=device), valid, rows)
                hidden = router.loop.run(model.forward(inputs, cache))  # on the engine's loop (the dispatcher's)
                tokens = model.dense.head(hidden).argmax(-1, keepdim=True)  # [B, 1]
                sync(torch.device(device))
                times.append(time.perf_counter() - start)
            router.shutdown()
        finally:
            proc.kill()
    step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"layers": config.n_layers, "d_model": config.d_model, "batch": batch, "step_seconds": step,
            "tokens_per_s": batch / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes: runs on a CPU in seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    small = args.small
    repeat = 3 if small else 10
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or "cpu", "small": small, "torch": torch.__version__}
    report["copy"] = copy_bandwidth(device, (8 << 20) if small else (1 << 30), repeat)
    report["matmul"] = matmul_rate(device, 256 if small else 8192, repeat)
    bandwidth = report["copy"]["bytes_per_s"] if device.type == "cpu" else _hbm_bandwidth(device, repeat)
    report["hbm_bytes_per_s"] = bandwidth
    counts = [1, 8, 32] if small else [1, 16, 128, 512, 2048]
    report["expert_ffn"] = expert_ffn_vs_roofline(device, moe_layer_config(small), counts, bandwidth,
                                                  report["matmul"]["flops_per_s"], repeat)
    report["dispatch_hop"] = dispatch_hop(device, moe_layer_config(small), 16 if small else 2048, repeat)
    report["decode"] = decode_through_router(args.device, small, steps=4 if small else 16, batch=2 if small else 32)
    print(f"device: {report['device']}")
    print(f"copy host→device {report['copy']['bytes_per_s'] / 1e9:8.1f} GB/s   "
          f"bf16 matmul {report['matmul']['flops_per_s'] / 1e12:8.2f} TFLOP/s   "
          f"device memory {bandwidth / 1e9:8.1f} GB/s")
    print("expert FFN (one MoE layer):  tokens  experts  ms      roofline ms  × roofline  TFLOP/s")
    for row in report["expert_ffn"]:
        print(f"                             {row['tokens']:>6}  {row['experts_touched']:>7}  "
              f"{row['seconds'] * 1e3:8.3f}  {row['roofline_seconds'] * 1e3:11.3f}  {row['over_roofline']:10.2f}  "
              f"{row['tflops']:7.2f}")
    hop = report["dispatch_hop"]
    print(f"dispatch hop staging ({hop['bytes'] / 1e6:.1f} MB): pageable {hop['pageable_seconds'] * 1e3:.2f} ms, "
          f"pinned {hop['pinned_seconds'] * 1e3:.2f} ms")
    dec = report["decode"]
    print(f"decode through router + worker ({dec['layers']} layers, d {dec['d_model']}, batch {dec['batch']}): "
          f"{dec['step_seconds'] * 1e3:.2f} ms/step, {dec['tokens_per_s']:.1f} tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def _hbm_bandwidth(device: torch.device, repeat: int) -> float:
    """Device-to-device copy of 1 GiB: read + write bytes per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), device, repeat)


if __name__ == "__main__":
    main()
