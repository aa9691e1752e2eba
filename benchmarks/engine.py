"""Engine throughput on CPU: B sessions scored together vs one StreamGuard session, same process.

    python -m benchmarks.engine                      # small shape, context 512, B 1,8,32,64, k 1,4
    python -m benchmarks.engine --quick              # tiny grid: checks the harness runs

For each k and B, the engine holds B sessions at `context` tokens and each step scores k new
tokens for every one of them, and one StreamGuard session at `context` tokens scores k tokens per
call; engine steps and lone calls alternate round by round (each rolled back after, untimed; the
second of two in a row timed, warm), so a shared box's drift hits both alike. Tokens/s are
medians.
The roofline column: a step must read the weights once plus every session's K/V; at the box's
copy bandwidth (a large tensor copy, bytes read + written, measured just before each cell) that
bounds tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.latency import weight_bytes
from qguard_stream.checkpoints import make_random_checkpoint
from qguard_stream.engine import Engine, EngineSettings, settle_heap
from qguard_stream.kvcache.paged import budget_tokens, bytes_per_token, default_block_size
from qguard_stream.stream import StreamGuard


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--sessions", default="1,8,32,64")
    parser.add_argument("--ks", default="1,4")
    parser.add_argument("--steps", type=int, default=30, help="timed rounds per cell")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shape and grid")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    return parser.parse_args(argv)


def copy_bandwidth_gbps() -> float:
    """Bytes read + written per second by a 256 MB tensor copy (median of 5)."""
    source = torch.randn(2**26)
    target = torch.empty_like(source)
    target.copy_(source)
    times = []
    for _ in range(5):
        began = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - began)
    return 2 * source.numel() * 4 / statistics.median(times) / 1e9


def cell(guard: StreamGuard, engine: Engine, batch: int, context: int, k: int,
         steps: int) -> tuple[float, float]:
    """(engine tokens/s, one session's tokens/s): B engine sessions and one StreamGuard session
    at `context` tokens; each round runs two engine steps (k new tokens for every session) and
    then two k-token calls of the lone session, each rolled back after (untimed), and times the
    second of each two (the first finds the caches filled by the other side). Alternating them
    round by round puts both in the same moments of a shared box; medians of `steps` rounds
    after two warm-up rounds."""
    gen = torch.Generator().manual_seed(2)
    sessions = [engine.open() for _ in range(batch)]
    prompts = torch.randint(0, 151000, (batch, context), generator=gen)
    for first in range(0, batch, 8):
        engine.moderate_many([(s, prompts[i], "user")
                              for i, s in enumerate(sessions[first:first + 8], start=first)])
    alone = guard.open_stream()
    guard.moderate(alone, prompts[0], "user")
    engine_times, alone_times = [], []
    for step in range(steps + 2):
        ids = torch.randint(0, 151000, (batch, k), generator=gen)
        # Each side twice, the second timed: warm, as in a run of steps (the other side's turn
        # evicted the caches).
        for _ in range(2):
            began = time.perf_counter()
            engine.moderate_many([(s, ids[i], "assistant") for i, s in enumerate(sessions)])
            taken = time.perf_counter() - began
            for s in sessions:
                engine.rollback(s, context)
        for _ in range(2):
            began = time.perf_counter()
            guard.moderate(alone, ids[0], "assistant")
            alone_taken = time.perf_counter() - began
            guard.rollback(alone, context)
        if step >= 2:
            engine_times.append(taken)
            alone_times.append(alone_taken)
    guard.close_stream(alone)
    for s in sessions:
        engine.close(s)
    return batch * k / statistics.median(engine_times), k / statistics.median(alone_times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        args.shape, args.context, args.sessions, args.ks, args.steps = "tiny", 32, "1,4", "1,2", 3
    torch.set_num_threads(args.threads)
    sessions = [int(s) for s in args.sessions.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        guard = StreamGuard.from_pretrained(make_random_checkpoint(Path(tmp) / "m", args.shape),
                                            device="cpu")
    engine = Engine(guard, EngineSettings(max_tokens=budget_tokens(
        max(sessions), args.context + max(ks), default_block_size("cpu"))))
    settle_heap()  # as the server does once its engine is built; undone after (tests call this)
    try:
        weights, kv = weight_bytes(guard), bytes_per_token(guard.config, guard.dtype)
        rows, measured = [], []
        for k in ks:
            for batch in sessions:
                # The bandwidth next to each cell: on a shared box it moves during a run.
                gbps = copy_bandwidth_gbps()
                measured.append(gbps)
                tokens_per_s, alone = cell(guard, engine, batch, args.context, k, args.steps)
                floor_s = (weights + batch * (args.context + k) * kv) / (gbps * 1e9)
                roofline = batch * k / floor_s
                rows.append({"k": k, "sessions": batch,
                             "engine_tokens_per_s": round(tokens_per_s, 1),
                             "single_session_tokens_per_s": round(alone, 1),
                             "engine_vs_single": round(tokens_per_s / alone, 2),
                             "copy_gbps": round(gbps, 1),
                             "roofline_tokens_per_s": round(roofline, 1),
                             "fraction_of_roofline": round(tokens_per_s / roofline, 3)})
                print(f"k {k} B {batch:3d}: engine {tokens_per_s:9.1f} tok/s, one session "
                      f"{alone:8.1f}, ratio {tokens_per_s / alone:5.2f}, "
                      f"{100 * tokens_per_s / roofline:5.1f}% of roofline", flush=True)
    finally:
        gc.unfreeze()
    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "shape": args.shape, "context": args.context, "threads": args.threads,
            "copy_gbps": round(statistics.median(measured), 1),
            "weight_mb": round(weights / 1e6, 2),
            "kv_bytes_per_token": kv, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"engine_{report['shape']}_cpu.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
