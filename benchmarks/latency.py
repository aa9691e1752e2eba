"""Per-token scoring latency: our runtime vs the model card's loop vs transformers + DynamicCache.

On one random checkpoint, in one process, for every (context, k): open a session holding `context`
prompt tokens, then time calls that score k new tokens, rolling the session back to `context`
after each call (untimed) so every call sees the same context. Variants: (a) ours
(StreamGuard.moderate), (b) the model card's loop (re-runs the whole sequence per call), (c)
transformers' Qwen3Model with a DynamicCache fed only new tokens; see baselines.py; and, when the
`openvino` package is importable (pip install openvino; never a dependency of ours), (d) the same
backbone as a stateful OpenVINO model in fp32 and in OpenVINO's default precision; see
openvino_baseline.py. Prints a table with the ratios of each to (a), writes JSON and a PNG plot.
On CUDA it adds the roofline: weight bytes / HBM bandwidth (measured with a device copy, or
--hbm-gbps) and our step time as a multiple of it. `--load N` runs N busy processes beside it
for the whole run (tails on a shared CPU: compare p99 and max with a run without).

    python -m benchmarks.latency                     # CPU, shape "small", full grid
    python -m benchmarks.latency --shape overhead --quick
    python -m benchmarks.latency --shape 8b --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from benchmarks.baselines import CachedTransformers, CardLoop, load_hf_backbone
from benchmarks.openvino_baseline import openvino_available, openvino_runners
from qguard_stream.checkpoints import SHAPES, make_random_checkpoint
from qguard_stream.stream import StreamGuard

VARIANTS = ("ours", "card_loop", "hf_dynamic_cache", "openvino_fp32", "openvino_default")
OPENVINO = ("openvino_fp32", "openvino_default")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Cell:
    variant: str
    context: int
    k: int
    calls: int
    p50_ms: float
    p99_ms: float
    max_ms: float = 0.0

    @property
    def per_token_ms(self) -> float:
        return self.p50_ms / self.k


class Ours:
    """(a) StreamGuard.moderate on one session."""

    name = "ours"

    def __init__(self, guard: StreamGuard) -> None:
        self.guard = guard
        self.state = guard.open_stream()

    def reset(self, prompt_ids: torch.Tensor) -> None:
        self.guard.close_stream(self.state)
        self.state = self.guard.open_stream()
        self.guard.moderate(self.state, prompt_ids, "user")

    def step(self, new_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        verdicts = self.guard.moderate(self.state, new_ids, "assistant")
        return verdicts.risk_probs, verdicts.category_probs

    def rollback(self, length: int) -> None:
        self.guard.rollback(self.state, length)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared with the `qguard-stream bench` subcommand)."""
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES),
                        help="random checkpoint shape (default: small)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    parser.add_argument("--ks", type=_int_list, default=(1, 4, 16, 64),
                        help="tokens per call, comma separated (default: 1,4,16,64)")
    parser.add_argument("--contexts", type=_int_list, default=(128, 1024, 4096),
                        help="prompt context lengths (default: 128,1024,4096)")
    parser.add_argument("--calls", type=int, default=30, help="timed calls per cell (a, c)")
    parser.add_argument("--card-calls", type=int, default=5, help="timed calls per cell (b)")
    parser.add_argument("--variants", type=_str_list, default=VARIANTS,
                        help=f"subset of {','.join(VARIANTS)} (the OpenVINO ones run only where "
                             f"the openvino package is importable)")
    parser.add_argument("--hbm-gbps", type=float, default=None,
                        help="CUDA: nominal HBM bandwidth in GB/s (default: measure a copy)")
    parser.add_argument("--quick", action="store_true",
                        help="contexts 128,1024, k 1,16, fewer calls (under 2 min on 2 cores)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, tiny grid: checks the harness runs, times nothing useful")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"),
                        help="directory for latency_<shape>_<device>.json/.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load", type=int, default=0, metavar="N",
                        help="start N CPU-bound processes for the run (a shared CPU's tails)")


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in text.split(",") if part)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16, got {text!r}")
    return values


def _str_list(text: str) -> tuple[str, ...]:
    values = tuple(part for part in text.split(",") if part)
    unknown = set(values) - set(VARIANTS)
    if unknown or not values:
        raise argparse.ArgumentTypeError(
            f"unknown variants {sorted(unknown)}; pick from {VARIANTS}")
    return values


def _apply_modes(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.contexts, args.ks = (128, 1024), (1, 16)
        args.calls, args.card_calls = min(args.calls, 15), min(args.card_calls, 3)
    if args.smoke:
        args.shape, args.contexts, args.ks = "tiny", (16, 64), (1, 4)
        args.calls, args.card_calls = 3, 2
    return args


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args`; print the table, write JSON (and PNG)."""
    args = _apply_modes(args)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    max_positions = max(8192, max(args.contexts) + max(args.ks) + 16)
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_random_checkpoint(Path(tmp) / args.shape, args.shape, seed=args.seed,
                                           dtype=dtype, max_position_embeddings=max_positions,
                                           device=device)
        guard = StreamGuard.from_pretrained(directory, device=device, dtype=dtype)
        runners = _runners(args.variants, guard, directory, device, dtype, args.threads)
    if args.load < 0:
        raise SystemExit(f"--load must be >= 0, got {args.load}")
    with competing_processes(args.load):
        cells = measure(runners, args, guard.config.vocab_size, device)
    floor_ms = roofline_ms(guard, device, args.hbm_gbps) if device.type == "cuda" else None
    report = _report(args, device, dtype, cells, floor_ms)
    report["ours_step"] = ours_step(guard)
    report["openvino"] = {runner.name: runner.properties for runner in runners
                          if runner.name in OPENVINO}
    print(f"ours: {report['ours_step']}")
    print(format_table(cells, floor_ms))
    args.out.mkdir(parents=True, exist_ok=True)
    # Not Path.with_suffix: a shape named "0.6b" would lose ".6b_cuda" to it.
    stem = f"latency_{args.shape}_{device.type}"
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    json_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {json_path}")
    if not args.no_plot:
        try:
            plot(cells, png_path, f"{args.shape} on {device.type}, {dtype}")
            print(f"wrote {png_path}")
        except ImportError:  # matplotlib comes with the dev extra
            print("no plot: matplotlib is not installed (pip install matplotlib, or the dev "
                  "extra); the JSON has every figure")
    return 0


def ours_step(guard: StreamGuard) -> str:
    """Which step (a) took for small steps: the reader of a table needs to know whether the C
    step was built on that machine, and whether CUDA graphs were replayed."""
    runner = guard.paged_runtime()[1]
    if runner is None:
        return "core module path"
    if runner.captured:
        return "paged runner, CUDA graphs per token bucket for chunks <= 16 tokens"
    if runner.cpu_step is not None:
        return "paged runner, C step (kernels/cpu_step.c) for <= 16 tokens, torch ops beyond"
    return "paged runner, eager (no CUDA graphs, no C step)"


def _runners(variants: tuple[str, ...], guard: StreamGuard, directory: Path,
             device: torch.device, dtype: torch.dtype, threads: int) -> list:
    runners = []
    head = guard.model.response
    backbone = None
    for name in variants:
        if name in OPENVINO:
            continue
        if name == "ours":
            runners.append(Ours(guard))
            continue
        backbone = backbone or load_hf_backbone(directory, guard.config, device, dtype)
        runners.append(CardLoop(backbone, head) if name == "card_loop"
                       else CachedTransformers(backbone, head))
    wanted = tuple(name.removeprefix("openvino_") for name in variants if name in OPENVINO)
    if not wanted:
        return runners
    if device.type != "cpu":
        print(f"openvino: skipped (it is the CPU baseline; this run is on {device.type})")
    elif not openvino_available():
        print("openvino: skipped (the openvino package is not importable; pip install openvino "
              "to time it beside ours)")
    else:
        runners += openvino_runners(directory, guard.config, head, threads, wanted)
        for runner in runners[-len(wanted):]:
            print(f"{runner.name}: {runner.properties}")
    return runners


def measure(runners: list, args: argparse.Namespace, vocab: int, device: torch.device
            ) -> list[Cell]:
    """Time every runner on every (context, k) cell, in one process, on the same token ids.
    Calls are interleaved across runners (one call each, round-robin), so load from other
    processes on a shared machine falls on every variant alike."""
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (max(args.contexts),), generator=generator)
    new = torch.randint(0, vocab, (max(args.ks),), generator=generator)
    sync = _synchronizer(device)
    cells = []
    for context in args.contexts:
        for runner in runners:
            runner.reset(prompt[:context])
        for k in args.ks:
            times = _time_interleaved(runners, new[:k], context, args, sync)
            for runner in runners:
                cells.append(_cell(runner.name, context, k, times[runner.name]))
                print(f"  {runner.name:17s} context {context:5d} k {k:3d}: "
                      f"{cells[-1].per_token_ms:9.3f} ms/token", flush=True)
    return cells


def _time_interleaved(runners: list, new_ids: torch.Tensor, context: int,
                      args: argparse.Namespace, sync: Callable[[], None]) -> dict[str, list[float]]:
    for runner in runners:  # warm-up: first-call allocations, graph capture, lazy init
        for _ in range(2):
            runner.step(new_ids)
            runner.rollback(context)
    sync()
    times: dict[str, list[float]] = {runner.name: [] for runner in runners}
    for call in range(max(args.calls, args.card_calls)):
        for runner in runners:
            limit = args.card_calls if runner.name == "card_loop" else args.calls
            if call >= limit:
                continue
            began = time.perf_counter()
            runner.step(new_ids)
            sync()
            times[runner.name].append((time.perf_counter() - began) * 1e3)
            runner.rollback(context)
    return times


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _cell(variant: str, context: int, k: int, times: list[float]) -> Cell:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return Cell(variant, context, k, len(times), statistics.median(ordered), p99, ordered[-1])


@contextlib.contextmanager
def competing_processes(count: int) -> Iterator[list[subprocess.Popen]]:
    """`count` CPU-bound processes (a busy loop each) for the duration of the block, killed
    after it (each in its own process group, so nothing outlives the run)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             start_new_session=True) for _ in range(count)]
    try:
        if busy:
            time.sleep(0.5)  # let the scheduler see them before the first timed call
        yield busy
    finally:
        for process in busy:
            process.kill()
        for process in busy:
            process.wait(timeout=10)


def weight_bytes(guard: StreamGuard) -> int:
    """Bytes a k=1 step must read: every backbone and head weight except the embedding table
    (one row of it), each counted once (the modules' q/k/v views share the fused storage)."""
    seen, total = set(), 0
    for name, tensor in guard.model.named_parameters():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if name.endswith("embed_tokens.weight") or key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def measure_hbm_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth (bytes read + written), median of 20 copies of 1 GiB."""
    source = torch.randn(2**28, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * source.numel() * source.element_size() / statistics.median(times) / 1e9


def roofline_ms(guard: StreamGuard, device: torch.device, hbm_gbps: float | None) -> float:
    gbps = hbm_gbps or measure_hbm_gbps(device)
    print(f"roofline: {weight_bytes(guard) / 1e9:.3f} GB of weights at {gbps:.0f} GB/s")
    return weight_bytes(guard) / (gbps * 1e9) * 1e3


def format_table(cells: list[Cell], floor_ms: float | None) -> str:
    by_key = {(c.variant, c.context, c.k): c for c in cells}
    openvino = any(c.variant in OPENVINO for c in cells)
    header = (f"{'context':>7} {'k':>3} | {'ours p50':>9} {'ours p99':>9} {'ours max':>9} "
              f"{'ours/tok':>9} | "
              f"{'card/tok':>9} {'hf/tok':>9} | {'card/ours':>9} {'hf/ours':>8}")
    if openvino:
        header += f" | {'ov32/tok':>9} {'ovdef/tok':>9} | {'ov32/ours':>9} {'ovdef/ours':>10}"
    if floor_ms is not None:
        header += f" | {'floor':>7} {'x floor':>7}"
    lines = ["per-call and per-token latency in ms (p50 unless marked)", header,
             "-" * len(header)]
    for context, k in sorted({(c.context, c.k) for c in cells}):
        ours = by_key.get(("ours", context, k))
        card = by_key.get(("card_loop", context, k))
        hf = by_key.get(("hf_dynamic_cache", context, k))
        line = (f"{context:7d} {k:3d} | {_ms(ours and ours.p50_ms)} {_ms(ours and ours.p99_ms)} "
                f"{_ms(ours and ours.max_ms)} {_ms(ours and ours.per_token_ms)} | "
                f"{_ms(card and card.per_token_ms)} {_ms(hf and hf.per_token_ms)} | "
                f"{_ratio(card, ours):>9} {_ratio(hf, ours):>8}")
        if openvino:
            ov32 = by_key.get(("openvino_fp32", context, k))
            ovdef = by_key.get(("openvino_default", context, k))
            line += (f" | {_ms(ov32 and ov32.per_token_ms)} {_ms(ovdef and ovdef.per_token_ms)} | "
                     f"{_ratio(ov32, ours, 2):>9} {_ratio(ovdef, ours, 2):>10}")
        if floor_ms is not None and ours is not None:
            line += f" | {floor_ms:7.3f} {ours.p50_ms / floor_ms:7.2f}"
        lines.append(line)
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{value:9.3f}" if value is not None else f"{'-':>9}"


def _ratio(other: Cell | None, ours: Cell | None, digits: int = 1) -> str:
    if other is None or ours is None:
        return "-"
    return f"{other.per_token_ms / ours.per_token_ms:.{digits}f}x"


def _report(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            cells: list[Cell], floor_ms: float | None) -> dict:
    shape = SHAPES[args.shape]
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else "cpu"},
        "shape": {"name": args.shape, **asdict(shape)},
        "dtype": str(dtype).removeprefix("torch."),
        "roofline_ms": floor_ms,
        "competing_processes": args.load,
        "cells": [{**asdict(c), "per_token_ms": c.per_token_ms} for c in cells],
    }


def plot(cells: list[Cell], path: Path, title: str) -> None:
    """Per-token latency vs context, one line per (variant, k), log-log; colour = k,
    line style = variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    styles = {"ours": "-", "card_loop": ":", "hf_dynamic_cache": "--", "openvino_fp32": "-.",
              "openvino_default": (0, (1, 3))}
    colours = {k: f"C{i}" for i, k in enumerate(sorted({c.k for c in cells}))}
    for variant, k in sorted({(c.variant, c.k) for c in cells}):
        points = sorted((c.context, c.per_token_ms) for c in cells
                        if c.variant == variant and c.k == k)
        axes.plot([p[0] for p in points], [p[1] for p in points], linestyle=styles[variant],
                  marker="o", color=colours[k], label=f"{variant} k={k}")
    axes.set(xscale="log", yscale="log", xlabel="context (tokens)",
             ylabel="p50 latency per token (ms)", title=title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
