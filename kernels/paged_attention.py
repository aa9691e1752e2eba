"""Paged attention in Triton: up to 16 new queries per session against its K/V in a block pool.

Sessions are packed: session s owns query rows q_start[s] .. q_start[s] + q_len[s] - 1 of q
[T, heads, head_dim] (pre-scaled, RoPE applied), at positions ctx_len[s] - q_len[s] ..
ctx_len[s] - 1, and attends causally to keys 0 .. its own position. Its keys and values live in
the pool, viewed as [num_blocks, page, kv_heads, head_dim] (any strides: the pool's blocks are
head-major, kvcache/paged.py), at the blocks listed in block_tables[s]; they are
read in place through the table (no gather) and once per KV head for all the query heads sharing
it (GQA rows stacked: row r of a program is query r // group, head r % group), never repeated.

One program per (session, KV head, key split). With one split the program normalises and writes
its rows; with several (few sessions: flash-decoding), each session's keys are cut into
NUM_SPLITS equal tile-aligned parts (sized from its own context, so every split has work), each
split writes its unnormalised partial output and (max, sum) statistics and a second kernel
combines them. The launcher picks the split count from the sessions in the launch, so one
session's step spreads over the GPU, and never fewer than MIN_SPLITS: a program that walks a
whole context alone leaves the memory system idle between its tiles (H200, 8B, context 1,024:
one split per session made 64 and 256 sessions 20-40% slower than two 512-key splits). Sessions
with q_len 0 (padding in a captured graph) and splits past a session's context do nothing, so one
launch shape serves every step of a CUDA-graph bucket.

Matches `reference.paged_attention_reference` (softmax in fp32, probabilities cast to the value
dtype before the product, as flash-attn does). Runs on CUDA tensors, or on CPU tensors when
imported under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
MAX_QUERIES = 16  # new tokens per session in one launch
KEY_TILE = 64  # keys per inner iteration
MAX_SPLITS = 16
MIN_SPLITS = 4  # the launcher's floor (see the module docstring)


@triton.jit
def _dot(a, b, DOT_IN_FP32: tl.constexpr):
    # The interpreter multiplies bf16 bit patterns (triton-lang/triton#11584): upcast there.
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, stats_ptr,
        block_tables_ptr, q_start_ptr, q_len_ptr, ctx_len_ptr,
        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_ot, stride_oh,
        stride_bt, num_heads,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        DOT_IN_FP32: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_len = tl.load(q_len_ptr + seq)
    ctx = tl.load(ctx_len_ptr + seq)
    split_keys = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    key_lo = split * split_keys
    if (q_len > 0) & (key_lo < ctx):
        key_hi = tl.minimum(ctx, key_lo + split_keys)
        q_start = tl.load(q_start_ptr + seq)
        rows = tl.arange(0, BLOCK_M)
        query = rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = query < q_len
        dims = tl.arange(0, HEAD_DIM)
        q_offsets = (q_start + query)[:, None] * stride_qt + head[:, None] * stride_qh
        q = tl.load(q_ptr + q_offsets + dims[None, :], mask=row_ok[:, None], other=0.0)
        position = ctx - q_len + query  # each query sees keys 0..position
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        table = block_tables_ptr + seq * stride_bt
        for start in range(key_lo, key_hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < key_hi
            block = tl.load(table + keys // PAGE, mask=key_ok, other=0).to(tl.int64)
            kv_offsets = (block * stride_kb + (keys % PAGE) * stride_ks
                          + kv_head * stride_kh)[:, None] + dims[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=key_ok[:, None], other=0.0)
            scores = _dot(q, tl.trans(k), DOT_IN_FP32)
            visible = key_ok[None, :] & (keys[None, :] <= position[:, None])
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_offsets, mask=key_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_IN_FP32)
            m_i = m_new
        out_rows = q_start + query
        if NUM_SPLITS == 1:
            out = acc / l_i[:, None]
            o_offsets = out_rows[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
            tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            # partials [T, heads, NUM_SPLITS, HEAD_DIM] fp32, stats [T, heads, NUM_SPLITS, 2]
            slot = (out_rows * num_heads + head) * NUM_SPLITS + split
            tl.store(part_ptr + slot[:, None] * HEAD_DIM + dims[None, :], acc,
                     mask=row_ok[:, None])
            tl.store(stats_ptr + slot * 2, m_i, mask=row_ok)
            tl.store(stats_ptr + slot * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_splits_kernel(out_ptr, part_ptr, stats_ptr, row_seq_ptr, ctx_len_ptr,
                           stride_ot, stride_oh, num_heads,
                           HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                           NUM_SPLITS: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(row_seq_ptr + row)
    if seq >= 0:
        ctx = tl.load(ctx_len_ptr + seq)
        used = tl.cdiv(ctx, tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        base = (row * num_heads + head) * NUM_SPLITS
        m = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for split in range(0, used):
            m_s = tl.load(stats_ptr + (base + split) * 2 + tl.arange(0, 1))
            l_s = tl.load(stats_ptr + (base + split) * 2 + 1 + tl.arange(0, 1))
            m_new = tl.maximum(m, m_s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            old = tl.exp(m - m_safe)
            new = tl.exp(m_s - m_safe)
            part = tl.load(part_ptr + (base + split) * HEAD_DIM + dims)
            acc = acc * old + part * new
            total = total * old + l_s * new
            m = m_new
        out = acc / total
        tl.store(out_ptr + row * stride_ot + head * stride_oh + dims,
                 out.to(out_ptr.dtype.element_ty))


class PagedAttention:
    """Launches paged attention for one model shape; owns the split workspace (sized once, so
    CUDA-graph replays reuse it).

    `max_rows`: the most query rows one launch may hold. The split count per launch is
    `num_splits` when given, else chosen from the launch's sessions: enough programs to cover
    the GPU's multiprocessors about four times, between MIN_SPLITS and MAX_SPLITS.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, page: int,
                 max_rows: int, device: torch.device, num_splits: int | None = None) -> None:
        if num_heads % num_kv_heads:
            raise ValueError(f"heads ({num_heads}) must be a multiple of kv heads "
                             f"({num_kv_heads})")
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
        if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
            raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.page = (
            num_heads, num_kv_heads, head_dim, page)
        self.group = num_heads // num_kv_heads
        self.fixed_splits = num_splits
        self.max_rows = max_rows
        self.processors = (torch.cuda.get_device_properties(device).multi_processor_count
                           if device.type == "cuda" else 8)
        most = num_splits or MAX_SPLITS
        self.partials = torch.empty(max_rows, num_heads, most, head_dim, dtype=torch.float32,
                                    device=device)
        self.stats = torch.empty(max_rows, num_heads, most, 2, dtype=torch.float32,
                                 device=device)

    def splits_for(self, sessions: int) -> int:
        """Key splits for a launch over `sessions` sessions."""
        if self.fixed_splits is not None:
            return self.fixed_splits
        programs = sessions * self.num_kv_heads
        return max(MIN_SPLITS, min(MAX_SPLITS, 4 * self.processors // programs))

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
                 ctx_len: torch.Tensor, row_seq: torch.Tensor, out: torch.Tensor,
                 max_queries: int = MAX_QUERIES) -> torch.Tensor:
        """q/out [T, heads, head_dim] (T <= max_rows); k/v_cache [num_blocks, page, kv_heads,
        head_dim] views with the same strides; block_tables [S, max_blocks] int32;
        q_start/q_len/ctx_len [S] int32 (q_len 0: an unused slot); row_seq [T] int32 (each
        row's session, -1 for padding rows, which are left unwritten); `max_queries`: a bound on
        q_len (<= 16). Writes and returns `out`."""
        rows, sessions = q.shape[0], block_tables.shape[0]
        if rows > self.max_rows:
            raise ValueError(f"{rows} query rows exceed this launcher's max_rows "
                             f"{self.max_rows}")
        if not 1 <= max_queries <= MAX_QUERIES:
            raise ValueError(f"max_queries must be in [1, {MAX_QUERIES}], got {max_queries}")
        if sessions == 0 or rows == 0:
            return out
        splits = self.splits_for(sessions)
        block_m = max(16, triton.next_power_of_2(max_queries * self.group))
        _paged_attention_kernel[(sessions, self.num_kv_heads, splits)](
            q, k_cache, v_cache, out, self.partials, self.stats,
            block_tables, q_start, q_len, ctx_len,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            out.stride(0), out.stride(1), block_tables.stride(0), self.num_heads,
            GROUP=self.group, HEAD_DIM=self.head_dim, PAGE=self.page, BLOCK_M=block_m,
            BLOCK_N=KEY_TILE, NUM_SPLITS=splits, DOT_IN_FP32=INTERPRETED, num_warps=4,
            num_stages=2)
        if splits > 1:
            _combine_splits_kernel[(rows, self.num_heads)](
                out, self.partials, self.stats, row_seq, ctx_len,
                out.stride(0), out.stride(1), self.num_heads,
                HEAD_DIM=self.head_dim, BLOCK_N=KEY_TILE, NUM_SPLITS=splits, num_warps=4)
        return out
