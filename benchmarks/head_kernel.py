"""Micro-benchmark: the fused Triton guard head against the plain-PyTorch head (GPU only).

For the real head shapes (0.6B / 4B / 8B widths, inner 512) and several row counts k, times both
paths with triton.testing.do_bench (median of repeated launches, eager mode, no CUDA graphs) and
prints a markdown table with the effective bandwidth over the bytes each call must read (the
projection weight plus the rows). Also reports the largest probability difference between the two.

    python benchmarks/head_kernel.py [--dtype bf16|fp16|fp32] [--rows 1 7 16 64 512 4096]
"""

from __future__ import annotations

import argparse
import sys

import torch

SHAPES = {"0.6b": (1024, 8), "4b": (2560, 9), "8b": (4096, 9)}  # hidden, categories (R = 3)
INNER = 512
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def head_weights(hidden_size: int, categories: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen, device="cuda")).to(dtype)

    head_scale = 2.5 * INNER**-0.5  # logits of a few units: softmaxes neither flat nor saturated
    return [randn(INNER, hidden_size, scale=hidden_size**-0.5), 1 + randn(INNER, scale=0.1),
            randn(3, INNER, scale=head_scale), randn(categories, INNER, scale=head_scale)]


def bench_row(name: str, rows: int, dtype: torch.dtype) -> str:
    import triton.testing
    from qguard_stream.kernels import guard_head_reference
    from qguard_stream.kernels.guard_head import fused_guard_head

    hidden_size, categories = SHAPES[name]
    weights = head_weights(hidden_size, categories, dtype)
    hidden = (4 * torch.randn(rows, hidden_size, device="cuda")).to(dtype)
    fused = fused_guard_head(hidden, *weights, 1e-6)
    plain = guard_head_reference(hidden, *weights, 1e-6)
    diff = max((fused.risk_probs - plain.risk_probs).abs().max().item(),
               (fused.category_probs - plain.category_probs).abs().max().item())
    fused_ms = triton.testing.do_bench(lambda: fused_guard_head(hidden, *weights, 1e-6))
    torch_ms = triton.testing.do_bench(lambda: guard_head_reference(hidden, *weights, 1e-6))
    read_bytes = (weights[0].numel() + hidden.numel()) * hidden.element_size()
    return (f"| {name} | {rows} | {torch_ms * 1e3:.1f} | {fused_ms * 1e3:.1f} | "
            f"{torch_ms / fused_ms:.2f}x | {read_bytes / fused_ms / 1e6:.0f} | {diff:.1e} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 7, 16, 64, 512, 4096])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("head_kernel benchmark: no CUDA device; the fused kernel only runs on GPUs "
              "(CPU uses the plain PyTorch head). Nothing measured.", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, eager launches (do_bench median)\n")
    print("| head | k | torch us | fused us | speed-up | fused GB/s | max prob diff |")
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes:
        for rows in args.rows:
            print(bench_row(name, rows, DTYPES[args.dtype]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
