"""Benchmark: the router's decode step against its own arithmetic.

For a checkpoint, dtype, batch sizes and context length it measures, on the router's real engine (experts
in process, no network):

(a) the decode step as the engine runs it — scheduler → model runner → forward → head → sample → outputs —
    from the engine's own step timings, with the time split into parts (scheduling, inputs, attention,
    MoE routing, experts, head, sampling, streaming) by timers wrapped around those functions;
(b) the same step's matrix multiplies alone: the same shapes and the same weight tensors, replayed in the
    step's order (so weights come from wherever the step would read them, not from a hot cache);
(c) aten calls per step (torch.profiler: top-level, and all).

It prints step / matmul-only overall and per part, and writes JSON.

    python bench/step.py [--checkpoint demo] [--dtype float32] [--batch 1,8,32] [--context 64] [--steps 30]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from grokserve.cluster.spec import DEMO_CHECKPOINT
from grokserve.model.experts import LocalExperts
from grokserve.model.sampling import SamplingParams, make_generator
from grokserve.model.text_stream import TextStream
from grokserve.router.assembly import Router, build_router
from grokserve.router.sequence import Sequence, StepOutput
from grokserve.router.settings import EngineLimits

PARTS = ("scheduling", "inputs", "attention", "moe routing", "experts", "head", "sampling", "streaming")


class PartTimer:
    """Wraps functions of a live engine with wall-clock timers; seconds per part, per step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.active = False

    def wrap(self, part: str, fn: Callable) -> Callable:
        if asyncio.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def timed_async(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    if self.active:
                        self.seconds[part] += time.perf_counter() - start
            return timed_async

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.active:
                    self.seconds[part] += time.perf_counter() - start
        return timed


def instrument(router: Router, timer: PartTimer) -> None:
    engine = router.engine
    dense = engine.model.dense
    engine.scheduler.schedule = timer.wrap("scheduling", engine.scheduler.schedule)
    dense.attention_block = timer.wrap("attention", dense.attention_block)
    dense.moe_input = timer.wrap("moe routing", dense.moe_input)
    dense.moe_output = timer.wrap("moe routing", dense.moe_output)
    dense.head = timer.wrap("head", dense.head)
    engine.model.experts.forward = timer.wrap("experts", engine.model.experts.forward)
    engine._sample = timer.wrap("sampling", engine._sample)
    engine._advance = timer.wrap("streaming", engine._advance)  # detokenize, stop checks, hand to the sink
    engine.runner.build_inputs = timer.wrap("inputs", engine.runner.build_inputs)


def decode_steps(router: Router, batch: int, context: int, steps: int, dtype_name: str, timer: PartTimer,
                 profile: bool) -> dict:
    """`batch` sequences decoding at `context` tokens; timings of `steps` decode steps."""
    engine = router.engine
    config = engine.config
    rng = random.Random(batch)
    done = collections.Counter()

    def sink(out: StepOutput) -> None:  # the gRPC service's sink, minus the network
        if out.finish_reason or out.error:
            done["finished"] += 1

    sequences = []
    for i in range(batch):
        prompt = [rng.randrange(3, config.vocab_size) for _ in range(context)]
        params = SamplingParams(max_tokens=steps * 3 + 20, temperature=0.0, ignore_eos=True)
        seq = Sequence(request_id=f"bench-{i}", prompt_ids=prompt, params=params, generator=make_generator(i),
                       text_stream=TextStream(None), sink=sink)
        sequences.append(seq)
        engine.submit(seq)
    while min(len(s.output_ids) for s in sequences) < 2:  # prefill done, every sequence decoding
        time.sleep(0.005)
    before = len(engine.recent_steps)
    timer.seconds.clear()
    timer.active = True
    first_step = engine.steps
    aten = None
    if profile:
        aten = engine.loop.run(_count_aten_calls(engine, steps))
    else:
        while engine.steps < first_step + steps:
            time.sleep(0.002)
    timer.active = False
    records = list(engine.recent_steps)[before:before + steps]
    for seq in sequences:
        engine.cancel(seq)
    while engine.load()["running"] or engine.load()["waiting"]:
        time.sleep(0.01)
    n = len(records)
    parts = {part: timer.seconds.get(part, 0.0) / n for part in PARTS}
    step = statistics.median(r.seconds for r in records)
    return {"batch": batch, "context": context, "dtype": dtype_name, "steps": n, "step_seconds": step,
            "step_cpu_seconds": statistics.median(r.cpu_seconds for r in records),
            "step_seconds_mean": statistics.fmean(r.seconds for r in records), "parts_seconds": parts,
            "aten_calls_per_step": aten}


async def _count_aten_calls(engine, steps: int) -> dict:
    """Profile `steps` engine steps on the engine's own loop thread; aten calls per step."""
    from torch.profiler import ProfilerActivity, profile

    start = engine.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        while engine.steps < start + steps:
            await asyncio.sleep(0.0005)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"top_level": len(top) / steps, "all": len(events) / steps}


def matmul_replay(router: Router, batch: int, context: int, repeat: int) -> dict:
    """The matrix multiplies of one decode step at this batch and context, alone: the same weights and
    shapes in the step's order — attention projections, q·kᵀ and p·v, the router, each active expert's three
    matmuls (rows routed by a real router decision), the head."""
    dense = router.engine.model.dense
    experts = router.engine.model.experts
    assert isinstance(experts, LocalExperts)
    c = dense.config
    dt = dense.dtype
    x = torch.randn(batch, c.d_model).to(dt)
    ids = torch.stack([torch.randperm(c.n_experts)[:c.n_experts_per_token] for _ in range(batch)])  # [B, K]
    counts = torch.bincount(ids.reshape(-1), minlength=c.n_experts).tolist()
    keys = torch.randn(batch, c.n_kv_heads, context, c.head_dim).to(dt)
    queries = torch.randn(batch, c.n_kv_heads, c.q_per_kv, c.head_dim).to(dt)
    attention_out = torch.randn(batch, c.q_width).to(dt)

    def step() -> None:
        for layer in range(c.n_layers):
            w = dense.layers[layer]
            for name in ("wq", "wk", "wv", "wqkv"):
                if name in w:
                    F.linear(x, w[name])
            logits = torch.matmul(queries, keys.transpose(-1, -2))  # [B, Hkv, G, S]
            torch.matmul(logits, keys)  # p·v has the same shape as q·kᵀ's transpose
            F.linear(attention_out, w["wo"])
            F.linear(x.float(), w["router"])
            stack = experts.stacks[layer]
            for e, n in enumerate(counts):
                if n:
                    rows = x[:n]
                    F.linear(rows, stack["w_gate"][e])
                    h = F.linear(rows, stack["w_up"][e]).float()
                    F.linear(h.to(stack["w_down"].dtype) if experts.fast_down else h,
                             stack["w_down"][e] if experts.fast_down else stack["w_down"][e].float())
        F.linear(x, dense.embed_act)

    with torch.inference_mode():
        step()
        times, cpu = [], []
        for _ in range(repeat):
            start, start_cpu = time.perf_counter(), time.thread_time()
            step()
            times.append(time.perf_counter() - start)
            cpu.append(time.thread_time() - start_cpu)
    return {"matmul_seconds": statistics.median(times), "matmul_cpu_seconds": statistics.median(cpu)}


def part_matmuls(row: dict) -> None:
    """Derived: step / matmul-only, in wall time and in thread CPU time (the steadier of the two on a shared
    machine, where neighbours steal time)."""
    row["step_over_matmul"] = row["step_seconds"] / row["matmul_seconds"]
    row["step_over_matmul_cpu"] = row["step_cpu_seconds"] / row["matmul_cpu_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEMO_CHECKPOINT))
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or a comma list")
    parser.add_argument("--batch", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--context", type=int, default=64, help="prompt tokens before decoding starts")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtype.split(","):
        router = build_router(args.checkpoint, dtype, limits=EngineLimits(max_running=max(args.batch),
                                                                          kv_cache_mb=256))
        timer = PartTimer()
        instrument(router, timer)
        try:
            for batch in args.batch:
                row = decode_steps(router, batch, args.context, args.steps, dtype, timer, profile=False)
                row["aten_calls_per_step"] = decode_steps(router, batch, args.context, 5, dtype, PartTimer(),
                                                          profile=True)["aten_calls_per_step"]
                row.update(matmul_replay(router, batch, args.context + args.steps, repeat=args.steps))
                part_matmuls(row)
                rows.append(row)
                print_row(row)
        finally:
            router.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.platform(), "processor": _cpu_flags(),
                                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                                               "rows": rows}, indent=1))


def print_row(row: dict) -> None:
    parts = "  ".join(f"{p} {row['parts_seconds'][p] * 1e3:.2f}" for p in PARTS)
    aten = row["aten_calls_per_step"]
    print(f"{row['dtype']:>8} batch {row['batch']:>3}: step {row['step_seconds'] * 1e3:7.2f} ms, matmul-only "
          f"{row['matmul_seconds'] * 1e3:6.2f} ms, step/matmul {row['step_over_matmul']:5.2f} "
          f"(cpu {row['step_cpu_seconds'] * 1e3:.2f} / {row['matmul_cpu_seconds'] * 1e3:.2f} ms = "
          f"{row['step_over_matmul_cpu']:.2f}), "
          f"{row['batch'] / row['step_seconds']:7.1f} tok/s, aten/step {aten['top_level']:.0f} top-level "
          f"({aten['all']:.0f} all)\n    parts (ms): {parts}", flush=True)


def _cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return platform.processor()
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f" {f}" in flags]
    return " ".join(wanted)


if __name__ == "__main__":
    sys.exit(main())
