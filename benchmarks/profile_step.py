"""Where one engine step's GPU time goes: kernels per step and the top kernels, per shape and batch.

    python -m benchmarks.profile_step --out DIR                 # one CUDA GPU
    python -m benchmarks.profile_step --out DIR --dry           # tiny shape on CPU (harness check)

For each shape and batch size B (sessions at `--context` tokens, one new token each per step):
the step's wall time (p50 of `Engine.moderate_many`), then one profiled step: kernel launches,
kernel time, and the kernels that take the most time (calls per step, microseconds per call).
Then paged attention alone at each shape's head layout, for B sessions at that context, with
1-16 key splits (microseconds per launch against the K/V bytes read at the copy bandwidth; on
CPU only under TRITON_INTERPRET=1).
Writes profile_step.json and profile_step.txt into DIR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from qguard_stream.kernels.paged_attention import INTERPRETED, MAX_SPLITS, PagedAttention

from benchmarks.gpu_check import build
from benchmarks.latency import roofline_ms, weight_bytes
from qguard_stream.engine import Engine, EngineSettings
from qguard_stream.kvcache.paged import budget_tokens, default_block_size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry", action="store_true", help="tiny shape on CPU: harness check")
    parser.add_argument("--shapes", default="0.6b,8b")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--top", type=int, default=12)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry on CPU)", file=sys.stderr)
        return 2
    shapes = ["tiny"] if args.dry else [s for s in args.shapes.split(",") if s]
    batches = [1, 2] if args.dry else [int(b) for b in args.batches.split(",") if b]
    context = 32 if args.dry else args.context
    dtype = torch.float32 if args.dry else torch.bfloat16
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda"
                              else "cpu", "torch": torch.__version__, "context": context,
                              "shapes": {}}
    text: list[str] = []
    for shape in shapes:
        guard, tensors = build(shape, device, dtype)
        del tensors
        floor = roofline_ms(guard, device, None) if device.type == "cuda" else None
        bandwidth = guard_bandwidth(guard, floor)
        result: dict[str, Any] = {"floor_ms": floor, "steps": [], "attention": []}
        for batch in batches:
            step = profile_engine_step(guard, batch, context, args.top, device)
            result["steps"].append(step)
            text += [f"== {shape} B={batch} context={context}: step p50 {step['step_ms']:.3f} ms"
                     f" (weight floor {floor and round(floor, 3)} ms), {step['kernels']} kernels,"
                     f" {step['kernel_ms']:.3f} ms of kernel time", step["table"]]
            print("\n".join(text[-2:]), flush=True)
            if device.type == "cpu" and not INTERPRETED:
                continue  # the Triton kernel runs on CPU only under TRITON_INTERPRET=1
            result["attention"] += attention_splits(guard, batch, context, device, bandwidth)
            for row in result["attention"][-len(split_grid(device)):]:
                line = (f"   attention {shape} B={batch}: splits {row['splits']:2d} "
                        f"{row['us']:8.1f} us  ({row['x_floor']:.1f}x the K/V read)")
                text.append(line)
                print(line, flush=True)
        report["shapes"][shape] = result
        del guard
        if device.type == "cuda":
            torch.cuda.empty_cache()
    (args.out / "profile_step.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "profile_step.txt").write_text("\n".join(text) + "\n")
    return 0


def guard_bandwidth(guard: Any, floor_ms: float | None) -> float | None:
    """Copy bandwidth (bytes/s) behind the weight floor, for the attention floors."""
    if not floor_ms:
        return None
    return weight_bytes(guard) / (floor_ms / 1e3)


def profile_engine_step(guard: Any, batch: int, context: int, top: int,
                        device: torch.device) -> dict[str, Any]:
    engine = Engine(guard, EngineSettings(max_tokens=budget_tokens(batch, context + 16,
                                                                   default_block_size(device)),
                                          max_graph_tokens=max(batch, 1),
                                          max_batch_tokens=max(8192, context)))
    gen = torch.Generator().manual_seed(3)
    vocab = guard.config.vocab_size
    sessions = [engine.open() for _ in range(batch)]
    prompts = torch.randint(0, vocab, (batch, context), generator=gen)
    for first in range(0, batch, 8):
        engine.moderate_many([(s, prompts[i], "user")
                              for i, s in enumerate(sessions[first:first + 8], start=first)])

    def step() -> None:
        ids = torch.randint(0, vocab, (batch,), generator=gen)
        engine.moderate_many([(s, [int(ids[i])], "assistant") for i, s in enumerate(sessions)])

    times = []
    for i in range(8):
        began = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - began)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiled = 3
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profiled):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if device.type == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time_total)
    rows = sorted(((sum(t), len(t), name) for name, t in kernels.items()), reverse=True)
    total_us = sum(r[0] for r in rows) / profiled
    table = "\n".join(f"   {us / profiled:9.1f} us/step {calls // profiled:5d} calls "
                      f"{us / calls:8.2f} us/call  {name[:90]}" for us, calls, name in rows[:top])
    for s in sessions:
        engine.close(s)
    return {"batch": batch, "step_ms": statistics.median(times) * 1e3,
            "kernels": sum(r[1] for r in rows) // profiled, "kernel_ms": total_us / 1e3,
            "top": [{"name": n, "us_per_step": us / profiled, "calls_per_step": c // profiled}
                    for us, c, n in rows[:top]], "table": table}


def split_grid(device: torch.device) -> list[int]:
    return [1, 2] if device.type == "cpu" else [s for s in (1, 2, 4, 8, 16) if s <= MAX_SPLITS]


def attention_splits(guard: Any, batch: int, context: int, device: torch.device,
                     bandwidth: float | None) -> list[dict[str, Any]]:
    """Paged attention alone, one query per session, at each split count."""
    config, dtype, page = guard.config, guard.dtype, 16
    heads, kv_heads, dim = (config.num_attention_heads, config.num_key_value_heads,
                            config.head_dim)
    blocks = -(-context // page)
    k_cache = torch.randn(batch * blocks, page, kv_heads, dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
    q = torch.randn(batch, heads, dim, device=device, dtype=dtype)
    out = torch.empty_like(q)
    ones = torch.ones(batch, dtype=torch.int32, device=device)
    q_start = torch.arange(batch, dtype=torch.int32, device=device)
    ctx = torch.full((batch,), context, dtype=torch.int32, device=device)
    row_seq = torch.arange(batch, dtype=torch.int32, device=device)
    kv_bytes = 2 * batch * context * kv_heads * dim * k_cache.element_size()
    rows = []
    for splits in split_grid(device):
        attend = PagedAttention(heads, kv_heads, dim, page, batch, device, num_splits=splits)

        def run(attend: PagedAttention = attend) -> None:
            attend(q, k_cache, v_cache, tables, q_start, ones, ctx, row_seq, out, max_queries=1)

        us = time_us(run, device)
        floor_us = kv_bytes / bandwidth * 1e6 if bandwidth else float("nan")
        rows.append({"batch": batch, "splits": splits, "us": us, "kv_bytes": kv_bytes,
                     "x_floor": us / floor_us if bandwidth else float("nan")})
    return rows


def time_us(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3
    fn()
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e6


if __name__ == "__main__":
    raise SystemExit(main())
