"""The paged runner: one step over many sessions' new-token chunks, K/V in one block pool.

Every session, one or a thousand, is a block table into the pool (kvcache/paged.py): growth never
copies K/V and rollback frees blocks. A step packs the chunks' tokens into rows and runs
`layer.decoder_layer` over them with one of two op sets:

- Triton (CUDA, or CPU under TRITON_INTERPRET=1 in tests): RMSNorm, q/k norm + RoPE + the K/V
  write straight into the pool slots, paged attention through the block tables (up to 16 new
  tokens per session; longer chunks read the pool in place through flash-attn when it is
  installed, the dtype is fp16/bf16 and the block size a multiple of 256, else gather their
  context and run SDPA), SiLU * up. On CUDA, steps
  of up to `max_graph_tokens` rows replay a CUDA graph captured at warm-up for their token bucket
  (1, 2, 4, 8, then multiples of 8); padding rows write nowhere and padding sessions do nothing.
- C (fp32 or bf16 CPU, up to 16 new tokens per session: every stream step): cpu_step.CpuStep,
  the same layer in C, attention over the pool through the block tables, all sessions in one
  call; a single token is one C call per layer.
- torch (any other CPU step: prompts, other dtypes, no C compiler): the same formulas as eager
  ops, each session's context gathered from the pool for attention.

What a step returns is its `output` (outputs.py): guard scores for every row (StreamGuard, the
engine) or next-token logits for each session's last row (Gen decoding). The step's result comes
back to the host in one copy (pinned, on CUDA). `forward` is thread-safe (one step at a time).
This module owns no session bookkeeping.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from qguard_stream.kernels import triton_available
from qguard_stream.kernels.cpu_step import load as cpu_step_library
from qguard_stream.kvcache.paged import BlockPool, BlockTable
from qguard_stream.packing import int64s
from qguard_stream.runtime.attention import (
    FLASH_PAGE,
    attend,
    flash_paged,
    flash_paged_available,
)
from qguard_stream.runtime.cpu_step import MAX_TOKENS as C_STEP_TOKENS
from qguard_stream.runtime.cpu_step import (
    CpuStep,
    HostMeta,
    host_meta,
    threads_with_room,
    torch_threads,
)
from qguard_stream.runtime.layer import (
    ActFn,
    NormFn,
    decoder_layer,
    qk_norm_rope,
    rms_norm,
    silu_mul,
)
from qguard_stream.runtime.outputs import StepOutput
from qguard_stream.runtime.weights import FusedWeights

MAX_QUERIES = 16  # new tokens per session served by the paged-attention kernel (and graphs)
KvStore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PoolAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def token_buckets(max_tokens: int) -> list[int]:
    """Captured step sizes in rows: 1, 2, 4, 8, then multiples of 8 up to max_tokens."""
    buckets = [b for b in (1, 2, 4, 8) if b <= max_tokens]
    buckets += list(range(16, max_tokens + 1, 8))
    if max_tokens not in buckets:
        buckets.append(max_tokens)
    return sorted(set(buckets))


@dataclass(frozen=True)
class Chunk:
    """New tokens of one session: positions start..start+len(token_ids)-1, scored by `role`."""

    table: BlockTable
    start: int
    token_ids: torch.Tensor  # 1-D int64, CPU
    role: str


# Metadata fields of a step, all int32, packed in this order into one buffer: per row (rows), then
# per session (sessions), then the block tables (sessions x max_blocks).
ROW_FIELDS = ("token_ids", "positions", "slots", "row_seq", "user")
SESSION_FIELDS = ("q_start", "q_len", "ctx_len")


@dataclass(frozen=True)
class FlashRows:
    """Where each packed row sits in flash-attn's [sessions, width] query layout: a session's
    new tokens fill the end of its `width` rows (flash-attn aligns causality bottom-right)."""

    index: torch.Tensor  # [rows] int64, on the device: row r -> session * width + offset
    sessions: int
    width: int

    @classmethod
    def of(cls, chunks: list[Chunk], device: torch.device) -> FlashRows:
        width = max(chunk.token_ids.shape[0] for chunk in chunks)
        index = [s * width + width - chunk.token_ids.shape[0] + j
                 for s, chunk in enumerate(chunks) for j in range(chunk.token_ids.shape[0])]
        return cls(int64s(index).to(device), len(chunks), width)


@dataclass(frozen=True)
class StepMeta:
    """One step's metadata as views of one int32 buffer (device, or host for the torch ops)."""

    token_ids: torch.Tensor  # [rows]
    positions: torch.Tensor  # [rows]
    slots: torch.Tensor  # [rows] pool slot of each new token; -1: padding (written nowhere)
    row_seq: torch.Tensor  # [rows] session of each row; -1: padding
    user: torch.Tensor  # [rows] 1 where the row is scored with the query (user) heads
    q_start: torch.Tensor  # [sessions] first row of each session
    q_len: torch.Tensor  # [sessions] its new tokens; 0: an unused session slot
    ctx_len: torch.Tensor  # [sessions] its length after this step
    block_tables: torch.Tensor  # [sessions, max_blocks]
    header: torch.Tensor  # every field before block_tables, as one view (written in one copy)

    @classmethod
    def view(cls, buffer: torch.Tensor, rows: int, sessions: int, max_blocks: int) -> StepMeta:
        sizes = [rows] * len(ROW_FIELDS) + [sessions] * len(SESSION_FIELDS)
        parts = list(buffer[:sum(sizes) + sessions * max_blocks].split(
            [*sizes, sessions * max_blocks]))
        tables = parts.pop().view(sessions, max_blocks)
        return cls(*parts, block_tables=tables, header=buffer[:sum(sizes)])

    @staticmethod
    def size(rows: int, sessions: int, max_blocks: int) -> int:
        return rows * len(ROW_FIELDS) + sessions * (len(SESSION_FIELDS) + max_blocks)


def fill_meta(meta: StepMeta, chunks: list[Chunk], block_size: int) -> None:
    """Write the chunks' metadata into host views; rows and sessions past them are padding.
    Positions, slots, per-session fields and the tables come packed from host_meta (the C
    step's packing, arrays built from plain lists); the tables are written as one strided copy
    into the sessions' rows (zero past a session's blocks up to the widest table; columns past
    that are left as they were), the rest in one copy."""
    rows, sessions = meta.token_ids.shape[0], meta.q_len.shape[0]
    if chunks:
        packed = host_meta(chunks, block_size)
        tables = torch.frombuffer(packed.tables, dtype=torch.int32)
        meta.block_tables[:len(chunks), :packed.width].copy_(tables.view(len(chunks), -1))
    else:  # a graph's capture: every row and session is padding
        packed = HostMeta(*(array("i") for _ in range(3)), 0, *(array("i") for _ in range(3)))
    token_ids: list[int] = []
    row_seq: list[int] = []
    user: list[int] = []
    for index, chunk in enumerate(chunks):
        new = chunk.token_ids.shape[0]
        token_ids += chunk.token_ids.tolist()
        row_seq += [index] * new
        user += [int(chunk.role == "user")] * new
    pad_rows, pad_sessions = rows - len(token_ids), sessions - len(chunks)
    zeros, minus = array("i", bytes(4 * pad_rows)), array("i", [-1]) * pad_rows
    no_sessions = array("i", bytes(4 * pad_sessions))
    header = (  # in StepMeta's field order; padding rows write nowhere
        array("i", token_ids) + zeros + packed.positions + zeros + packed.slots + minus
        + array("i", row_seq) + minus + array("i", user) + zeros + packed.q_start + no_sessions
        + packed.q_len + no_sessions + packed.ctx_len + no_sessions)
    meta.header.copy_(torch.frombuffer(header, dtype=torch.int32))


class PagedRunner:
    """Runs steps of packed chunks over a BlockPool (see the module docstring).

    `use_triton` (default: on CUDA when triton imports) picks the Triton ops; `use_graphs`
    (default: on CUDA with the Triton ops) captures CUDA graphs for steps of up to
    `max_graph_tokens` rows, at construction; `use_c_step` (default: on an fp32 or bf16 CPU pool
    when kernels/cpu_step.c builds here) runs steps of up to 16 tokens per session in C; `use_flash`
    (default: flash-attn installed, CUDA, fp16/bf16, a block size that is a multiple of 256)
    runs the attention of eager steps (chunks past 16 tokens) with flash-attn over the pool.
    """

    def __init__(self, weights: FusedWeights, output: StepOutput, pool: BlockPool,
                 use_triton: bool | None = None, use_graphs: bool | None = None,
                 max_graph_tokens: int = 256, use_c_step: bool | None = None,
                 use_flash: bool | None = None) -> None:
        self.w, self.output, self.pool = weights, output, pool
        self.device = weights.embed.device
        self.triton = (self.device.type == "cuda" and triton_available()) \
            if use_triton is None else use_triton
        graphs = self.triton and self.device.type == "cuda" if use_graphs is None else use_graphs
        if graphs and not (self.triton and self.device.type == "cuda"):
            raise ValueError("CUDA graphs need a CUDA model and the Triton ops")
        config = weights.config
        self.max_blocks = -(-config.max_position_embeddings // pool.block_size)
        self.lock = threading.Lock()
        self.flash = flash_paged_available(self.device, pool.kv.dtype, pool.block_size) \
            if use_flash is None else use_flash
        if self.flash and pool.block_size % FLASH_PAGE:
            raise ValueError(f"use_flash=True needs a block size that is a multiple of "
                             f"{FLASH_PAGE}, got {pool.block_size}")
        if self.triton:
            from qguard_stream.kernels import decode_ops

            eps = config.rms_norm_eps
            self.norm: NormFn = lambda x, weight: decode_ops.rms_norm(x, weight, eps)
            self.silu_mul: ActFn = decode_ops.silu_mul
        else:
            self.norm = lambda x, weight: rms_norm(x, weight, weights.eps)
            self.silu_mul = silu_mul
        self.cos2d, self.sin2d = weights.cos[:, 0], weights.sin[:, 0]  # [positions, D]
        self.attention = None
        self.max_graph_tokens = max_graph_tokens if graphs else 0
        if self.triton:
            from qguard_stream.kernels.paged_attention import PagedAttention

            self.attention = PagedAttention(
                config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                pool.block_size, max(max_graph_tokens, 256), self.device)
        self.cpu_step: CpuStep | None = None  # the C step, for fp32 and bf16 CPU steps
        if not self.triton and self.device.type == "cpu" \
                and pool.kv.dtype in (torch.float32, torch.bfloat16) \
                and weights.embed.dtype == pool.kv.dtype \
                and use_c_step is not False and (library := cpu_step_library()) is not None:
            self.cpu_step = CpuStep(weights, pool, library)
        # The CPU's eager steps (chunks past C_STEP_TOKENS) run torch on as many threads as the
        # machine has room for, by the library's look at it (none without the library).
        self.room = cpu_step_library() if self.device.type == "cpu" else None
        if use_c_step and self.cpu_step is None:
            raise ValueError("use_c_step=True needs an fp32 or bf16 CPU pool, the torch ops and "
                             "kernels/cpu_step.c built on this machine")
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.host_views: dict[int, StepMeta] = {}  # per bucket, over meta_host
        if graphs:
            self._capture_all()

    # ---- public ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> list[Any]:
        """The output's result for every chunk, in order, on the host (GuardScores: (risk_probs
        [k, R], category_probs [k, C]) fp32). Each chunk's table must already hold blocks for
        its new positions."""
        rows = sum(chunk.token_ids.shape[0] for chunk in chunks)
        longest = max(chunk.token_ids.shape[0] for chunk in chunks)
        with self.lock:
            if self.cpu_step is not None and longest <= C_STEP_TOKENS:
                ids = chunks[0].token_ids if len(chunks) == 1 else \
                    torch.cat([chunk.token_ids for chunk in chunks])
                meta = host_meta(chunks, self.pool.block_size)
                with torch_threads(1) as threads:  # the library's pool does the work
                    return self.output.on_host(self.cpu_step(ids, meta, threads), chunks)
            bucket = self._bucket(rows) if longest <= MAX_QUERIES else None
            if bucket is not None:
                probs = self._replay(chunks, bucket)
            else:  # torch's threads: as many as the machine has room for (all without a look)
                with torch_threads(threads_with_room(self.room, torch.get_num_threads())):
                    probs = self._eager(chunks, rows, longest)
        return self.output.split(probs, chunks)

    @property
    def captured(self) -> list[int]:
        """The token buckets with a captured CUDA graph."""
        return sorted(self.graphs)

    # ---- the step ------------------------------------------------------------------------------
    def step(self, meta: StepMeta, max_queries: int | None,
             flash_rows: FlashRows | None = None) -> torch.Tensor:
        """The output's [rows or sessions, width] fp32 result for the rows of `meta` (device
        views). `max_queries`: the longest chunk when the paged-attention kernel serves the
        step; else `flash_rows` when flash-attn does; else attention runs on the host metadata
        (gathered).
        What does not depend on the layer (RoPE rows, write slots, the attention backend) is
        settled once here, not per layer."""
        w, pool = self.w, self.pool
        store = self._kv_store(meta)
        attention = self._attention(meta, max_queries, flash_rows)
        x = F.embedding(meta.token_ids, w.embed)
        for index, layer in enumerate(w.layers):
            keys, values = pool.layer(index)  # [blocks, page, KV, D] views

            def attend(qkv: torch.Tensor, qk_norm: torch.Tensor = layer.qk_norm,
                       keys: torch.Tensor = keys, values: torch.Tensor = values) -> torch.Tensor:
                return attention(store(qkv, qk_norm, keys, values), keys, values)

            x = decoder_layer(x, layer, self.norm, attend, self.silu_mul)
        return self.output.on_device(self.norm(x, w.final_norm), meta)

    def _kv_store(self, meta: StepMeta) -> KvStore:
        """(qkv, qk_norm, keys, values) -> q: q/k norm, RoPE, and the new K/V into the pool."""
        w = self.w
        if self.triton:
            from qguard_stream.kernels.decode_ops import qk_norm_rope_store

            def store_triton(qkv: torch.Tensor, qk_norm: torch.Tensor, keys: torch.Tensor,
                             values: torch.Tensor) -> torch.Tensor:
                q = torch.empty(qkv.shape[0], w.heads, w.head_dim, dtype=qkv.dtype,
                                device=qkv.device)
                return qk_norm_rope_store(qkv, qk_norm, self.cos2d, self.sin2d, meta.positions,
                                          meta.slots, q, keys, values, w.config.rms_norm_eps)

            return store_triton
        cos = w.cos.index_select(0, meta.positions)
        sin = w.sin.index_select(0, meta.positions)
        written = meta.slots >= 0
        slots = meta.slots[written].long()
        blocks, offsets = slots // self.pool.block_size, slots % self.pool.block_size

        def store_torch(qkv: torch.Tensor, qk_norm: torch.Tensor, keys: torch.Tensor,
                        values: torch.Tensor) -> torch.Tensor:
            q, new_kv = qk_norm_rope(qkv, qk_norm, cos, sin, w.eps, w.heads, w.kv_heads)
            keys[blocks, offsets] = new_kv[written, 0]
            values[blocks, offsets] = new_kv[written, 1]
            return q

        return store_torch

    def _attention(self, meta: StepMeta, max_queries: int | None,
                   flash_rows: FlashRows | None) -> PoolAttention:
        """(q, keys, values) -> [rows, H * D] for this step: the Triton paged kernel, flash-attn
        over the pool, or each session's context gathered."""
        if flash_rows is not None:
            def flash(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
                sessions, width, index = flash_rows.sessions, flash_rows.width, flash_rows.index
                padded = q.new_zeros(sessions * width, *q.shape[1:])
                padded[index] = q
                out = flash_paged(padded.view(sessions, width, *q.shape[1:]), keys, values,
                                  meta.ctx_len, meta.block_tables)
                return out.reshape(sessions * width, -1)[index]

            return flash
        if max_queries is not None:
            assert self.attention is not None
            launch = self.attention

            def paged(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
                out = torch.empty_like(q)
                launch(q, keys, values, meta.block_tables, meta.q_start,
                       meta.q_len, meta.ctx_len, meta.row_seq, out, max_queries=max_queries)
                return out.view(q.shape[0], -1)

            return paged
        return lambda q, keys, values: self._gathered_attention(q, keys, values, meta)

    def _gathered_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            meta: StepMeta) -> torch.Tensor:
        """Attention per session over its context gathered from the pool (host metadata)."""
        out = torch.zeros(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
        block = self.pool.block_size
        for s in range(meta.q_len.shape[0]):
            new = int(meta.q_len[s])
            if new == 0:
                continue
            first, end = int(meta.q_start[s]), int(meta.ctx_len[s])
            positions = torch.arange(end, device=meta.block_tables.device)
            blocks = meta.block_tables[s].long()[positions // block].to(keys.device)
            offsets = (positions % block).to(keys.device)
            context_keys = keys[blocks, offsets].transpose(0, 1)  # [KV, ctx, D]
            context_values = values[blocks, offsets].transpose(0, 1)
            out[first:first + new] = attend(q[first:first + new], context_keys, context_values,
                                            end - new, self.w.key_positions)
        return out

    # ---- eager and replayed steps ------------------------------------------------------------
    def _eager(self, chunks: list[Chunk], rows: int, longest: int) -> torch.Tensor:
        sessions = len(chunks)
        host = torch.empty(StepMeta.size(rows, sessions, self.max_blocks), dtype=torch.int32)
        fill_meta(StepMeta.view(host, rows, sessions, self.max_blocks), chunks,
                  self.pool.block_size)
        paged = self.triton and longest <= MAX_QUERIES and rows <= self.attention.max_rows
        meta = StepMeta.view(host.to(self.device, non_blocking=True), rows, sessions,
                             self.max_blocks)
        flash_rows = FlashRows.of(chunks, self.device) if self.flash and not paged else None
        if not paged and flash_rows is None:  # attention reads the session metadata on the host
            host_meta = StepMeta.view(host, rows, sessions, self.max_blocks)
            meta = replace(meta, q_start=host_meta.q_start, q_len=host_meta.q_len,
                           ctx_len=host_meta.ctx_len, block_tables=host_meta.block_tables)
        return self.step(meta, longest if paged else None, flash_rows).cpu()

    def _bucket(self, rows: int) -> int | None:
        return next((b for b in sorted(self.graphs) if b >= rows), None)

    def _capture_all(self) -> None:
        """Capture one graph per token bucket, largest first, in one shared memory pool."""
        largest = token_buckets(self.max_graph_tokens)[-1]
        self.meta_device = torch.zeros(StepMeta.size(largest, largest, self.max_blocks),
                                       dtype=torch.int32, device=self.device)
        self.meta_host = torch.zeros_like(self.meta_device, device="cpu").pin_memory()
        self.out_host = torch.zeros(largest, self.output.width,
                                    dtype=torch.float32).pin_memory()
        self.copied = torch.cuda.Event()
        memory = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for bucket in reversed(token_buckets(self.max_graph_tokens)):
                meta = StepMeta.view(self.meta_device, bucket, bucket, self.max_blocks)
                fill_meta(StepMeta.view(self.meta_host, bucket, bucket, self.max_blocks), [],
                          self.pool.block_size)  # all padding: captured steps write nothing
                self.meta_device.copy_(self.meta_host)
                queries = min(MAX_QUERIES, bucket)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS handles
                    self.step(meta, queries)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=memory):
                    out = self.step(meta, queries)
                self.graphs[bucket] = (graph, out)
        torch.cuda.synchronize()

    def _replay(self, chunks: list[Chunk], bucket: int) -> torch.Tensor:
        # The header and the tables of the step's sessions only: the bucket's other session
        # slots are padding (q_len 0), whose stale table rows nothing reads (16 sessions in the
        # 256-row bucket: 172 KB instead of 2.6 MB).
        size = StepMeta.size(bucket, bucket, 0) + len(chunks) * self.max_blocks
        views = self.host_views.get(bucket)
        if views is None:
            views = self.host_views[bucket] = StepMeta.view(self.meta_host, bucket, bucket,
                                                            self.max_blocks)
        fill_meta(views, chunks, self.pool.block_size)
        self.meta_device[:size].copy_(self.meta_host[:size], non_blocking=True)
        graph, out = self.graphs[bucket]
        graph.replay()
        host = self.out_host[:bucket]
        host.copy_(out, non_blocking=True)  # the step's one device-to-host copy
        self.copied.record()
        self.copied.synchronize()
        return host.clone()
