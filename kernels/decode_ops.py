"""The decode step's small fused kernels in Triton: RMSNorm, q/k norm + RoPE + paged K/V write,
and SiLU(gate) * up. Each replaces a chain of 2-10 eager ops with one launch; in a decode step at
small batch the launches, not the bytes, are the cost.

Cast points follow the eager step (runtime/fused.py, the formulas in reference.py): statistics
in fp32, the normalised value rounded to the input dtype before the weight, RoPE as
round(round(x * cos) + roll(x) * sin), SiLU rounded before the product. bf16 rounding is spelled
out in bits (triton_common.round_to) because the interpreter truncates fp32 -> bf16 casts. Runs
on CUDA tensors, or on CPU tensors when imported under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qguard_stream.kernels.triton_common import round_to

INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, eps, n, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)
    dtype = out_ptr.dtype.element_ty
    out = round_to(round_to(x * inv, dtype) * w, dtype)
    tl.store(out_ptr + row * stride_o + cols, out.to(dtype), mask=ok)


@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, w_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr,
                               q_ptr, k_ptr, v_ptr, eps, num_heads, num_kv_heads,
                               stride_qkv, stride_qt, stride_qh, stride_cos, stride_kb,
                               stride_ks, stride_kh, PAGE: tl.constexpr,
                               HEAD_DIM: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)  # 0..heads-1: q heads; heads..heads+kv-1: k heads (with their v)
    dims = tl.arange(0, HEAD_DIM)
    rolled = (dims + HEAD_DIM // 2) % HEAD_DIM
    base = qkv_ptr + row * stride_qkv + head * HEAD_DIM
    x = tl.load(base + dims).to(tl.float32)
    x_rolled = tl.load(base + rolled).to(tl.float32)
    w = tl.load(w_ptr + head * HEAD_DIM + dims).to(tl.float32)
    w_rolled = tl.load(w_ptr + head * HEAD_DIM + rolled).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / HEAD_DIM + eps)
    dtype = q_ptr.dtype.element_ty
    normed = round_to(round_to(x * inv, dtype) * w, dtype)
    normed_rolled = round_to(round_to(x_rolled * inv, dtype) * w_rolled, dtype)
    position = tl.load(positions_ptr + row)
    cos = tl.load(cos_ptr + position * stride_cos + dims).to(tl.float32)
    sin = tl.load(sin_ptr + position * stride_cos + dims).to(tl.float32)
    roped = round_to(round_to(normed * cos, dtype) + normed_rolled * sin, dtype).to(dtype)
    if head < num_heads:
        tl.store(q_ptr + row * stride_qt + head * stride_qh + dims, roped)
    else:
        slot = tl.load(slots_ptr + row).to(tl.int64)  # int64 before the offset arithmetic
        if slot >= 0:  # padding rows write nowhere
            kv_head = head - num_heads
            offset = ((slot // PAGE) * stride_kb + (slot % PAGE) * stride_ks
                      + kv_head * stride_kh + dims)
            tl.store(k_ptr + offset, roped)
            v = tl.load(qkv_ptr + row * stride_qkv + (head + num_kv_heads) * HEAD_DIM + dims)
            tl.store(v_ptr + offset, v)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, inner, stride_g, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inner
    gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_g + inner + cols, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = round_to(gate / (1.0 + tl.exp(-gate)), dtype)
    tl.store(out_ptr + row * stride_o + cols, round_to(silu * up, dtype).to(dtype), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Qwen3's RMSNorm of each row of x [T, n] (rows contiguous)."""
    out = torch.empty_like(x) if out is None else out
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](x, weight, out, eps, x.shape[1], x.stride(0),
                                        out.stride(0), BLOCK=triton.next_power_of_2(x.shape[1]),
                                        num_warps=4)
    return out


def qk_norm_rope_store(qkv: torch.Tensor, qk_norm: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """From qkv [T, (H + 2 KV) * D]: q heads and k heads RMS-normed with their qk_norm rows
    [H + KV, D] (the scale folded into the q rows) and rotated at `positions` [T] with the
    tables cos/sin [max_positions, D] (sin sign-folded); q goes to q_out [T, H, D], k and the
    raw v to slot `slots[t]` (block slot // page, offset slot % page) of k_cache/v_cache
    [num_blocks, page, KV, D] (any strides, the same for both; slot -1: written nowhere).
    Returns q_out."""
    heads, dim = q_out.shape[1], q_out.shape[2]
    kv_heads = k_cache.shape[2]
    if qkv.shape[0]:
        _qk_norm_rope_store_kernel[(qkv.shape[0], heads + kv_heads)](
            qkv, qk_norm, cos, sin, positions, slots, q_out, k_cache, v_cache, eps, heads,
            kv_heads, qkv.stride(0), q_out.stride(0), q_out.stride(1), cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), PAGE=k_cache.shape[1],
            HEAD_DIM=dim, num_warps=1)
    return q_out


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [T, 2 * inner] (gate first) -> [T, inner]."""
    inner = gate_up.shape[1] // 2
    if out is None:
        out = torch.empty(gate_up.shape[0], inner, dtype=gate_up.dtype, device=gate_up.device)
    if gate_up.shape[0]:
        block = 1024
        _silu_mul_kernel[(gate_up.shape[0], triton.cdiv(inner, block))](
            gate_up, out, inner, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out
