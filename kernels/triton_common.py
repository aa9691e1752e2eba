"""Triton helpers shared by the kernels (jit functions only; imports triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest-even in `dtype`, kept as fp32: the value torch stores for an
    op's output in that dtype. bf16 is spelled out in bits because the interpreter truncates
    fp32 -> bf16 casts (compiled casts round to nearest-even already; this is the same result)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)
