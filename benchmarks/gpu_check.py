"""One command for anyone with one GPU: the CUDA tests, parity, latency and engine throughput.

    python -m benchmarks.gpu_check --out DIR          # one CUDA GPU, torch + Triton, no network
    python -m benchmarks.gpu_check --out DIR --dry    # tiny shape on CPU: checks the harness (CI)

On a machine without network that already has torch, Triton, transformers and safetensors,
install the project with `pip install --no-deps --no-build-isolation -e .` (build isolation
would try to download setuptools). Then `python -m benchmarks.profile_step --out DIR` says where
a step's GPU time goes.

1. The CUDA tests (pytest on the kernel, runner and engine test files), then the host CPU's bf16
   C-step tests (its bf16 dot instruction where the CPU has AVX512-BF16).
2. Parity at each shape (default 0.6b and 8b), bf16, random weights drawn on the GPU (no
   checkpoint written to disk): CUDA-graph replay vs the eager paged step vs transformers'
   Qwen3Model + DynamicCache over one stream (a prompt, chunks of 1-40 tokens, a rollback).
3. The latency grid (k = 1, 16; contexts 128, 1024, 4096): ours, the card's loop and transformers
   + DynamicCache, with the weight-read floor (weights / measured copy bandwidth).
4. Engine throughput at 1, 8, 64 and 256 sessions, each with a context of 1024, one token per
   session per step.
Writes gpu_check.json and gpu_check.md into DIR and prints a one-screen summary last.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.baselines import CachedTransformers, CardLoop, hf_backbone_from_tensors
from benchmarks.latency import Cell, Ours, format_table, measure, roofline_ms, weight_bytes
from qguard_stream.checkpoints import config_for, random_tensors
from qguard_stream.engine import Engine, EngineSettings, settle_heap
from qguard_stream.kvcache.paged import BlockPool, BlockTable, budget_tokens, default_block_size
from qguard_stream.loader import model_from_tensors
from qguard_stream.runtime.outputs import GuardScores
from qguard_stream.runtime.paged import Chunk, PagedRunner
from qguard_stream.stream import StreamGuard

CUDA_TESTS = ["tests/test_kernels.py", "tests/test_paged_attention.py", "tests/test_decode_ops.py",
              "tests/test_paged_runner.py", "tests/test_fastpath.py", "tests/test_engine.py"]
PARITY_STEPS = (1, 1, 3, 16, 1, 40, 1, 5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON/markdown")
    parser.add_argument("--dry", action="store_true",
                        help="tiny shape on CPU, tiny grid, no tests: checks the harness runs")
    parser.add_argument("--shapes", default="0.6b,8b", help="comma separated (default 0.6b,8b)")
    parser.add_argument("--sessions", default="1,8,64,256",
                        help="engine batch sizes (default 1,8,64,256)")
    parser.add_argument("--engine-context", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per latency cell")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--test-timeout", type=int, default=240, help="seconds for the tests")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry to check the harness on CPU)", file=sys.stderr)
        return 2
    shapes = ["tiny"] if args.dry else [s for s in args.shapes.split(",") if s]
    dtype = torch.float32 if args.dry else torch.bfloat16
    sessions = [1, 4] if args.dry else [int(s) for s in args.sessions.split(",") if s]
    report: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device), "dtype": str(dtype).removeprefix("torch."),
        "tests": None, "shapes": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.dry and not args.skip_tests:
        report["tests"] = run_tests(args.test_timeout)
        print(f"tests: {report['tests']['summary']}", flush=True)
        # The host CPU's bf16 C step (its native VDPBF16PS path where the CPU has it; skipped
        # tests otherwise): the GPU machines' CPUs may be the only ones at hand that have it.
        report["host_cpu_tests"] = run_tests(120, ["tests/test_cpu_step.py"], "bf16")
        print(f"host CPU bf16 tests: {report['host_cpu_tests']['summary']}", flush=True)
    for shape in shapes:
        report["shapes"][shape] = check_shape(shape, device, dtype, args, sessions)
        write(report, args.out)
    write(report, args.out)
    print(summary(report))
    failed = any("error" in part for result in report["shapes"].values()
                 for part in result.values() if isinstance(part, dict))
    failed |= any(not p.get("ok", True) for r in report["shapes"].values()
                  for p in [r.get("parity", {})])
    failed |= bool(report["tests"] and report["tests"]["returncode"] != 0)
    failed |= bool(report.get("host_cpu_tests") and report["host_cpu_tests"]["returncode"] != 0)
    return 1 if failed else 0


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "torch": torch.__version__, "device": "cpu",
            "host_cpu": host_cpu()}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def host_cpu() -> dict[str, Any]:
    """The host CPU's model and whether it has bf16 instructions (the CPU step's bf16
    projections use AVX512-BF16 where it exists)."""
    flags: list[str] = []
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    return {"model": model, "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags}


def run_tests(timeout: int, files: list[str] | None = None,
              select: str | None = None) -> dict[str, Any]:
    """pytest over `files` (default: the CUDA tests), `select` as its -k expression."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               *(files or CUDA_TESTS)]
    try:
        import pytest_asyncio  # noqa: F401
    except ImportError:  # async tests need it; the GPU images we test on lack it
        select = f"({select}) and not test_async" if select else "not test_async"
    if select:
        command += ["-k", select]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output, code = f"{expired.stdout or ''}\ntimed out after {timeout}s", -1
    lines = [line for line in output.splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if " passed" in line or " failed" in line
                 or "error" in line), lines[-1] if lines else "")
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"returncode": code, "summary": last.strip("= "), "failures": failures[:30],
            "tail": lines[-40:] if code else []}


def build(shape: str, device: torch.device, dtype: torch.dtype
          ) -> tuple[StreamGuard, dict[str, torch.Tensor]]:
    """A guard over random weights drawn on `device` (plus the tensors, for the baselines)."""
    config = config_for(shape)
    tensors = random_tensors(config, seed=0, dtype=dtype, device=device)
    model = model_from_tensors(config, tensors, device, dtype)
    return StreamGuard(model, kv_memory_gb=1.0 if device.type == "cuda" else None), tensors


def check_shape(shape: str, device: torch.device, dtype: torch.dtype, args: argparse.Namespace,
                sessions: list[int]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    began = time.perf_counter()
    guard, tensors = build(shape, device, dtype)
    result["build_s"] = round(time.perf_counter() - began, 1)
    backbone = hf_backbone_from_tensors(tensors, guard.config, device, dtype)
    result["parity"] = guarded("parity", shape, parity, guard, backbone, device)
    result["latency"] = guarded("latency", shape, latency, guard, backbone, device, args)
    del backbone, tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["engine"] = guarded("engine", shape, engine_throughput, guard, sessions, args, device)
    return result


def guarded(name: str, shape: str, part: Any, *args: Any) -> dict[str, Any]:
    began = time.perf_counter()
    try:
        out = part(*args)
    except Exception as error:  # keep going: report what broke, run the rest
        traceback.print_exc()
        out = {"error": f"{type(error).__name__}: {error}"}
    out["seconds"] = round(time.perf_counter() - began, 1)
    print(f"{shape} {name}: {json.dumps(out)[:400]}", flush=True)
    return out


# ---- parity --------------------------------------------------------------------------------------
def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def parity(guard: StreamGuard, backbone: Any, device: torch.device) -> dict[str, Any]:
    """One stream three ways: graphs, eager paged steps, transformers + DynamicCache."""
    gen = torch.Generator().manual_seed(1)
    vocab = guard.config.vocab_size
    prompt = torch.randint(0, vocab, (300,), generator=gen)
    steps = [torch.randint(0, vocab, (k,), generator=gen) for k in PARITY_STEPS]
    keep = 300 + sum(PARITY_STEPS[:2])

    def ours(runner: PagedRunner, pool: BlockPool) -> torch.Tensor:
        table, out, start = BlockTable(pool.block_size), [], 0
        for ids, role in [(prompt, "user"), *[(s, "assistant") for s in steps]]:
            table.grow(pool, start + len(ids))
            out.append(runner.forward([Chunk(table, start, ids, role)])[0][0])
            start += len(ids)
        table.shrink(pool, keep)  # roll back, then score again from there
        table.grow(pool, keep + len(steps[0]))
        out.append(runner.forward([Chunk(table, keep, steps[0], "assistant")])[0][0])
        table.shrink(pool, 0)
        return torch.cat([o.float().cpu() for o in out])

    heads = GuardScores({"user": guard.model.query, "assistant": guard.model.response})
    pool = BlockPool(guard.config, 64, 16, device, guard.dtype)
    eager = ours(PagedRunner(guard.fast, heads, pool, use_graphs=False), pool)
    results: dict[str, Any] = {}
    if device.type == "cuda":
        graphed_runner = PagedRunner(guard.fast, heads, pool, max_graph_tokens=64)
        graphed = ours(graphed_runner, pool)
        results["graphs_vs_eager"] = relative(graphed, eager)
    else:
        graphed = eager
    query = CachedTransformers(backbone, guard.model.query)
    response = CachedTransformers(backbone, guard.model.response)
    reference = [query.step(prompt)[0]]
    response.cache = query.cache
    reference += [response.step(ids)[0] for ids in steps]
    response.rollback(keep)
    reference.append(response.step(steps[0])[0])
    hf = torch.cat([r.float().cpu() for r in reference])
    results["ours_vs_transformers"] = relative(graphed, hf)
    results["argmax_agreement"] = float((graphed.argmax(1) == hf.argmax(1)).float().mean())
    tolerance = 5e-2 if guard.dtype == torch.bfloat16 else 1e-4
    results["tolerance"] = tolerance
    results["ok"] = all(v < tolerance for k, v in results.items()
                        if k in ("graphs_vs_eager", "ours_vs_transformers"))
    return results


# ---- latency ------------------------------------------------------------------------------------
def latency(guard: StreamGuard, backbone: Any, device: torch.device,
            args: argparse.Namespace) -> dict[str, Any]:
    dry = args.dry
    grid = argparse.Namespace(contexts=(16, 64) if dry else (128, 1024, 4096),
                              ks=(1, 4) if dry else (1, 16), calls=3 if dry else args.calls,
                              card_calls=2 if dry else 3, seed=0)
    head = guard.model.response
    runners = [Ours(guard), CardLoop(backbone, head), CachedTransformers(backbone, head)]
    cells = measure(runners, grid, guard.config.vocab_size, device)
    floor = roofline_ms(guard, device, None) if device.type == "cuda" else None
    print(format_table(cells, floor), flush=True)
    return {"floor_ms": floor, "weight_gb": weight_bytes(guard) / 1e9,
            "cells": [cell_json(c) for c in cells]}


def cell_json(cell: Cell) -> dict[str, Any]:
    return {"variant": cell.variant, "context": cell.context, "k": cell.k,
            "p50_ms": round(cell.p50_ms, 4), "p99_ms": round(cell.p99_ms, 4),
            "per_token_ms": round(cell.per_token_ms, 4)}


# ---- engine throughput --------------------------------------------------------------------------
def engine_throughput(guard: StreamGuard, sessions: list[int], args: argparse.Namespace,
                      device: torch.device) -> dict[str, Any]:
    """Tokens/s with B sessions each at `context` tokens, one token per session per step."""
    context = 32 if args.dry else args.engine_context
    steps = 3 if args.dry else 10
    tokens = budget_tokens(max(sessions), context + steps + 2, default_block_size(device))
    settings = EngineSettings(max_tokens=tokens, max_graph_tokens=max(sessions),
                              max_batch_tokens=max(8192, context))
    engine = Engine(guard, settings)
    settle_heap()  # as the server does once its engine is built; undone after (tests call this)
    try:
        gen = torch.Generator().manual_seed(2)
        rows = []
        for batch in sessions:
            opened = [engine.open() for _ in range(batch)]
            prompts = torch.randint(0, guard.config.vocab_size, (batch, context), generator=gen)
            for first in range(0, batch, 8):  # prefill a few sessions per step
                engine.moderate_many([(s, prompts[i], "user")
                                      for i, s in enumerate(opened[first:first + 8], start=first)])
            times = []
            for step in range(steps + 2):
                ids = torch.randint(0, guard.config.vocab_size, (batch,), generator=gen)
                began = time.perf_counter()
                engine.moderate_many([(s, [int(ids[i])], "assistant")
                                      for i, s in enumerate(opened)])
                if step >= 2:
                    times.append(time.perf_counter() - began)
            for s in opened:
                engine.close(s)
            step_s = statistics.median(times)
            rows.append({"sessions": batch, "step_ms": round(step_s * 1e3, 3),
                         "tokens_per_s": round(batch / step_s, 1)})
    finally:
        gc.unfreeze()
    one = rows[0]["step_ms"] if rows and rows[0]["sessions"] == 1 else None
    for row in rows:
        if one:
            row["step_vs_one"] = round(row["step_ms"] / one, 2)
            row["throughput_vs_one"] = round(row["tokens_per_s"] / (1e3 / one), 1)
    return {"context": context, "rows": rows, "captured": engine.runner.captured[-1:]}


# ---- output -------------------------------------------------------------------------------------
def write(report: dict[str, Any], out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# gpu_check {report['date_utc']}", "",
             f"{m['device']}, torch {m['torch']}, triton {m.get('triton')}, {report['dtype']}", ""]
    cpu = m.get("host_cpu", {})
    lines += [f"host CPU: {cpu.get('model')}, avx512_bf16 {cpu.get('avx512_bf16')}, "
              f"amx_bf16 {cpu.get('amx_bf16')}", ""]
    if report["tests"]:
        lines += [f"tests: {report['tests']['summary']}", ""]
    if report.get("host_cpu_tests"):
        lines += [f"host CPU bf16 tests: {report['host_cpu_tests']['summary']}", ""]
    for shape, result in report["shapes"].items():
        lines.append(f"## {shape}")
        parity_result = result.get("parity", {})
        lines.append(f"parity: {json.dumps(parity_result)}")
        lat = result.get("latency", {})
        if "cells" in lat:
            floor = lat.get("floor_ms")
            lines += ["", "| context | k | ours ms/step | ours ms/token | hf ms/token | card "
                      "ms/token | hf/ours | x floor |", "|---|---|---|---|---|---|---|---|"]
            by = {(c["variant"], c["context"], c["k"]): c for c in lat["cells"]}
            for (variant, context, k), cell in sorted(by.items()):
                if variant != "ours":
                    continue
                hf = by.get(("hf_dynamic_cache", context, k))
                card = by.get(("card_loop", context, k))
                ratio = hf["per_token_ms"] / cell["per_token_ms"] if hf else float("nan")
                x_floor = cell["p50_ms"] / floor if floor else float("nan")
                lines.append(f"| {context} | {k} | {cell['p50_ms']:.3f} | "
                             f"{cell['per_token_ms']:.3f} | {hf and hf['per_token_ms']} | "
                             f"{card and card['per_token_ms']} | {ratio:.1f}x | {x_floor:.2f} |")
        engine = result.get("engine", {})
        if "rows" in engine:
            lines += ["", f"engine, context {engine['context']}:", "",
                      "| sessions | step ms | tokens/s | step / one | tokens/s / one |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['sessions']} | {r['step_ms']} | {r['tokens_per_s']} | "
                      f"{r.get('step_vs_one')} | {r.get('throughput_vs_one')} |"
                      for r in engine["rows"]]
        for name in ("latency", "engine"):
            if "error" in result.get(name, {}):
                lines.append(f"{name} error: {result[name]['error']}")
        lines.append("")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    return "\n" + markdown(report)


if __name__ == "__main__":
    raise SystemExit(main())
