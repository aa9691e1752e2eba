"""Attention of k new queries against one session's KV prefix, with the backend picked per call.

Three backends compute the same function (softmax(q k^T * scale) v, causal, grouped-query):
flash-attn's KV-cache kernel when it imports and the tensors are fp16/bf16 on CUDA (`flash_paged`
reads a block pool in place, for the paged runner); a grouped
small-query path (two batched matmuls, the query heads of a KV group stacked as rows, so K/V are
never repeated or copied, unlike SDPA's enable_gqa fallbacks) for up to 64 queries, where SDPA's
CPU kernels are tuned for long queries; and SDPA for longer steps (prefill). The caller passes q
already scaled (the scale is folded into q_norm), so every backend runs with scale 1. This module
owns no cache: it reads the views it is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: pip install flash-attn (CUDA only)
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_with_kvcache = None

# Up to this many new tokens, the grouped small-query path (when flash-attn is absent).
SMALL_QUERY_TOKENS = 64


FLASH_DTYPES = (torch.float16, torch.bfloat16)  # flash-attn computes in these only
FLASH_PAGE = 256  # flash-attn 2 reads a paged cache only in blocks of a multiple of 256 tokens


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    """flash-attn's KV-cache kernel serves this call: installed, CUDA, fp16/bf16."""
    return flash_attn_with_kvcache is not None and device.type == "cuda" and dtype in FLASH_DTYPES


def flash_paged_available(device: torch.device, dtype: torch.dtype, block_size: int) -> bool:
    """flash-attn can read a block pool of this block size in place (no gather)."""
    return flash_available(device, dtype) and block_size % FLASH_PAGE == 0


def flash_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                ctx_len: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """flash-attn over a block pool, the new K/V already written: q [S, L, heads, dim]
    (pre-scaled; each session's new queries at the *end* of its L rows, since flash-attn aligns
    the causal mask to the bottom right: row i sees keys up to ctx_len - L + i), k/v_cache
    [num_blocks, page, kv_heads, dim] (any strides, the last dim contiguous), ctx_len [S] int32
    (each session's length with the new tokens), block_tables [S, max_blocks] int32.
    Returns [S, L, heads, dim]."""
    if flash_attn_with_kvcache is None:
        raise RuntimeError("flash-attn is not installed (pip install flash-attn)")
    return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=ctx_len,
                                   block_table=block_tables, softmax_scale=1.0, causal=True)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
           key_positions: torch.Tensor) -> torch.Tensor:
    """q: [new, heads, head_dim] (pre-scaled) at positions start..; keys/values:
    [kv_heads, start+new, head_dim]; key_positions: arange covering start+new.
    Returns [new, heads * head_dim]."""
    new = q.shape[0]
    if flash_available(q.device, q.dtype):
        return _flash(q, keys, values)
    if new <= SMALL_QUERY_TOKENS:
        return _grouped_small(q, keys, values, start, key_positions)
    return _sdpa(q, keys, values, start, key_positions)


def _flash(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # [kv_heads, L, dim] -> [1, L, kv_heads, dim]: a strided view; the kernel takes row/head
    # strides.
    new, heads, dim = q.shape
    k_cache, v_cache = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
    out = flash_attn_with_kvcache(q[None], k_cache, v_cache, cache_seqlens=keys.shape[1],
                                  softmax_scale=1.0, causal=True)
    return out.view(new, heads * dim)


def _grouped_small(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                   key_positions: torch.Tensor) -> torch.Tensor:
    new, length = q.shape[0], keys.shape[1]
    future = None
    if new > 1:
        future = key_positions[None, :length] > key_positions[start:start + new, None]
    return grouped_attention(q, keys, values, future)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      future: torch.Tensor | None) -> torch.Tensor:
    """q: [new, heads, dim] (pre-scaled); keys/values: [kv_heads, length, dim]; future: [new,
    length] bool, True where a key is hidden from a query (None: all visible). The query heads
    sharing a KV head are stacked as rows, so K/V are read in place, never repeated."""
    new, heads, dim = q.shape
    kv_heads, length = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    if new == 1:  # the rows are already in [kv_heads, group] order: views, not permute + copy
        rows = q.view(kv_heads, group, dim)
    else:
        rows = q.view(new, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(kv_heads, group * new,
                                                                             dim)
    scores = torch.bmm(rows, keys.transpose(1, 2))  # [kv_heads, group*new, length]
    if future is not None:
        scores.view(kv_heads, group, new, length).masked_fill_(future, float("-inf"))
    probs = _softmax(scores, values.dtype)
    out = torch.bmm(probs, values)  # [kv_heads, group*new, dim]
    if new == 1:
        return out.view(1, heads * dim)
    return out.view(kv_heads, group, new, dim).permute(2, 0, 1, 3).reshape(new, heads * dim)


def _softmax(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last dim in at least fp32, cast to `dtype` (no cast dispatch in fp32)."""
    if scores.dtype == torch.float32 and dtype == torch.float32:
        return torch.softmax(scores, dim=-1)
    accumulate = torch.promote_types(scores.dtype, torch.float32)
    return torch.softmax(scores, dim=-1, dtype=accumulate).to(dtype)


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
          key_positions: torch.Tensor) -> torch.Tensor:
    new, heads, dim = q.shape
    mask = None
    if start and new > 1:
        mask = key_positions[None, :keys.shape[1]] <= key_positions[start:start + new, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
        is_causal=start == 0 and new > 1, scale=1.0, enable_gqa=True,
    )
    return out[0].transpose(0, 1).reshape(new, heads * dim)
