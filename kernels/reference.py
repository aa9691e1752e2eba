"""The guard head in plain PyTorch: the formula the fused kernel must reproduce, used off CUDA.

One guard path for the scored rows: projection -> RMSNorm (Qwen3RMSNorm's cast points) -> risk and
category linear heads -> fp32 softmax -> winning id and probability. Works in any float dtype, so a
float64 call is the accuracy oracle for the bf16/fp32 paths. Owns no weights and no dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The dtypes the fused kernel (guard_head.py) runs in; the reference takes any float dtype.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class GuardHeadOutput:
    """One guard path's scores for k rows: full probabilities and the compact winners."""

    risk_probs: torch.Tensor  # [k, R] fp32 (float64 when computed in float64)
    category_probs: torch.Tensor  # [k, C] fp32
    risk_ids: torch.Tensor  # [k] int64, argmax of risk_probs
    category_ids: torch.Tensor  # [k] int64
    risk_max: torch.Tensor  # [k] the winning risk probability
    category_max: torch.Tensor  # [k]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm: normalise in fp32, cast back to x's dtype, then scale by the weight."""
    x32 = x.float() if x.dtype != torch.float64 else x
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def softmax_winners(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs, argmax ids, max prob) of a softmax taken in at least fp32."""
    probs = F.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    best_prob, best_id = probs.max(dim=-1)
    return probs, best_id, best_prob


def guard_head_reference(hidden: torch.Tensor, pre_w: torch.Tensor, norm_w: torch.Tensor,
                         risk_w: torch.Tensor, cat_w: torch.Tensor, eps: float) -> GuardHeadOutput:
    """hidden [k, H]; pre_w [inner, H]; norm_w [inner]; risk_w [R, inner]; cat_w [C, inner]."""
    inner = rms_norm(F.linear(hidden, pre_w), norm_w, eps)
    risk_probs, risk_ids, risk_max = softmax_winners(F.linear(inner, risk_w))
    cat_probs, cat_ids, cat_max = softmax_winners(F.linear(inner, cat_w))
    return GuardHeadOutput(risk_probs, cat_probs, risk_ids, cat_ids, risk_max, cat_max)


# ---- the decode step's kernels (kernels/paged_attention.py, kernels/decode_ops.py) ------------
def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, q_start: torch.Tensor,
                              q_len: torch.Tensor, ctx_len: torch.Tensor) -> torch.Tensor:
    """The formula paged_attention computes, session by session: gather the session's keys and
    values through its block table, softmax(q k^T) in fp32 under the causal mask (query i of
    q_len sits at position ctx_len - q_len + i), probabilities cast to the value dtype, times v.
    q [T, H, D] (pre-scaled); caches [blocks, page, KV, D]. Rows of no session come back zero."""
    out = torch.zeros_like(q)
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    for s in range(block_tables.shape[0]):
        n, ctx, first = int(q_len[s]), int(ctx_len[s]), int(q_start[s])
        if n == 0:
            continue
        positions = torch.arange(ctx)
        slots = block_tables[s].long()[positions // page] * page + positions % page
        keys = k_cache.reshape(-1, kv_heads, k_cache.shape[-1])[slots]  # [ctx, KV, D]
        values = v_cache.reshape(-1, kv_heads, v_cache.shape[-1])[slots]
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[first:first + n].transpose(0, 1)  # [H, n, D]
        scores = (queries.double() @ keys.double().transpose(1, 2)).to(
            torch.float64 if q.dtype == torch.float64 else torch.float32)
        hidden = positions[None, :] > (ctx - n + torch.arange(n))[:, None]
        probs = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
        out[first:first + n] = (probs.to(values.dtype) @ values).transpose(0, 1).to(q.dtype)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with sign-folded sin tables: round(round(x * cos) + roll(x, D/2) * sin) in x's
    dtype (torch.addcmul's single rounding of the second product and the sum)."""
    rolled = x.roll(x.shape[-1] // 2, -1)
    return torch.addcmul(x * cos, rolled, sin)


def qk_norm_rope_reference(qkv: torch.Tensor, qk_norm: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, positions: torch.Tensor, num_heads: int,
                           num_kv_heads: int, eps: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [T, H, D], k [T, KV, D], v [T, KV, D]) as decode_ops.qk_norm_rope_store makes them:
    the q and k heads RMS-normed with their qk_norm rows, then rotated at `positions`."""
    dim = qk_norm.shape[-1]
    rows = qkv.shape[0]
    qk = qkv[:, :(num_heads + num_kv_heads) * dim].reshape(rows, num_heads + num_kv_heads, dim)
    normed = rms_norm(qk, qk_norm, eps)
    roped = rope(normed, cos[positions][:, None, :], sin[positions][:, None, :])
    v = qkv[:, (num_heads + num_kv_heads) * dim:].reshape(rows, num_kv_heads, dim)
    return roped[:, :num_heads], roped[:, num_heads:], v


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) rounded to the input dtype, times up: gate_up [T, 2 * inner], gate first."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
