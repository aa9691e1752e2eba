"""The paged runner's step on the CPU, fp32 or bf16: runtime/layer.py's decoder layer in C
(kernels/cpu_step.c), K/V read and written in the paged pool through the block tables. In bf16 the
projection weights and the pool stay bf16 and are widened to fp32 as the library loads them; the
arithmetic, the norms and RoPE tables (fp32 copies) and the activations are fp32, except that on
a CPU with AVX512-BF16 the projections round their activations to bf16 and run on its bf16
dot-product instruction (`library.qg_bf16_dot()` says which).

The step's rows are the new tokens of one or many sessions, packed (at most MAX_TOKENS per
session). One row (one session feeding one token, the stream's common case): each layer is one C
call, qg_decode_layer (norms, the projections as C GEMVs, q/k norm + RoPE + the K/V store,
attention, SiLU). More rows: per layer C RMSNorm -> qkv projection -> C q/k norm + RoPE + store
into the rows' pool slots -> C attention of every session over its blocks in one call -> o_proj
+ residual -> C RMSNorm -> gate_up -> C SiLU*up -> down + residual, the projections as the
library's GEMM (qg_gemm: one pass over each weight for all rows). Every parallel part runs on the
library's own thread pool, with torch on one thread meanwhile (torch_threads(1)): two pools
spinning on the same cores slowed whole steps (measured on 2 cores: 8-64 sessions per step
14-27% faster with every GEMM in the library than with torch's BLAS for steps past 16 rows).
The metadata (positions, slots, block tables) is packed with array.array, not tensors: for one
token that costs microseconds, where a tensor per field costs more than the token's arithmetic.
Not thread-safe: the runner's lock serializes steps. Owns no session state and no weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from array import array
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from qguard_stream.kernels.cpu_step import pointer
from qguard_stream.kvcache.paged import BlockPool
from qguard_stream.runtime.layer import FastHead
from qguard_stream.runtime.weights import FusedWeights

if TYPE_CHECKING:
    from qguard_stream.runtime.paged import Chunk

# New tokens per session served by the C step (longer chunks, prompts, take the runner's eager
# torch step, whose GEMMs and SDPA prefill are compute-bound there).
MAX_TOKENS = 16
MAX_HEAD_DIM = 1024  # cpu_step.c's stack row


class HostMeta(NamedTuple):
    """A step's metadata as int32 arrays (addresses for the C calls)."""

    positions: array  # [rows]
    slots: array  # [rows] pool slot of each new token
    tables: array  # [sessions, width] block tables, zero-padded
    width: int
    q_start: array  # [sessions] first row of each session
    q_len: array  # [sessions]
    ctx_len: array  # [sessions] length after the step


def host_meta(chunks: Sequence[Chunk], block_size: int) -> HostMeta:
    """Pack the chunks' positions, slots and block tables (their tables already hold blocks for
    the new positions). Plain lists, one array per field at the end: a 256-session step packs in
    a few microseconds a session."""
    width = max(len(chunk.table.blocks) for chunk in chunks)
    pad = [0] * width
    positions: list[int] = []
    slots: list[int] = []
    q_start: list[int] = []
    q_len: list[int] = []
    ctx_len: list[int] = []
    tables: list[int] = []
    for chunk in chunks:
        blocks, start = chunk.table.blocks, chunk.start
        new = chunk.token_ids.shape[0]
        q_start.append(len(positions))
        q_len.append(new)
        ctx_len.append(start + new)
        if new == 1:
            positions.append(start)
            slots.append(blocks[start // block_size] * block_size + start % block_size)
        else:
            positions.extend(range(start, start + new))
            slots.extend(blocks[p // block_size] * block_size + p % block_size
                         for p in range(start, start + new))
        tables += blocks
        tables += pad[len(blocks):]
    return HostMeta(array("i", positions), array("i", slots), array("i", tables), width,
                    array("i", q_start), array("i", q_len), array("i", ctx_len))


@functools.cache
def _openmp_backend() -> bool:
    """Whether torch's intra-op threads are OpenMP's (resizable at any time)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


_torch_threads_lock = threading.Lock()
_torch_threads_depth = 0
_saved_threads = 1


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[int]:
    """Run torch's own ops on `count` threads inside the block and yield the thread count set
    before it. The C step runs them on one: it parallelizes on the library's pool, and torch's
    OpenMP workers, left spinning after each of torch's parallel ops, would take the cores from
    it (measured: k = 16 steps 7.4 ms with torch on one thread vs 10.1 with both pools on 2
    cores, quiet). The eager CPU step runs them on as many as the machine has room for
    (threads_with_room).

    libgomp keeps the thread count per thread for threads that have run a parallel region and
    process-wide for the others, so every entering thread sets its own (`count`) and every
    leaving one restores the count saved by the first to enter: whichever interleaving, each
    thread's count and the process-wide one end as they were (in between, a thread may briefly
    see its usual count again, which costs nothing but speed)."""
    global _torch_threads_depth, _saved_threads
    if not _openmp_backend():  # the native pool refuses resizing once it has run (warns)
        yield torch.get_num_threads()
        return
    with _torch_threads_lock:
        if _torch_threads_depth == 0:
            _saved_threads = torch.get_num_threads()
        _torch_threads_depth += 1
        threads = _saved_threads
        torch.set_num_threads(max(1, count))
    try:
        yield threads
    finally:
        with _torch_threads_lock:
            _torch_threads_depth -= 1
            torch.set_num_threads(threads)


def threads_with_room(library: ctypes.CDLL | None, threads: int) -> int:
    """How many of `threads` the machine has room for now (the library pool's look at the
    runnable tasks; `threads` without the library). On 2 cores with one busy process beside it,
    a 64-token eager step took 704 ms on torch's 2 OpenMP threads (each parallel op ends at a
    barrier that waits for a descheduled worker) and 32 ms on one; 19 ms on 2, quiet."""
    return threads if library is None else int(library.qg_threads_with_room(threads))


def _address(values: array) -> int:
    return values.buffer_info()[0]


class CpuStep:
    """Final hidden states of a packed CPU step over `pool`, through `library`: an fp32 guard, or
    a bf16 one (bf16 projection weights and K/V pool, widened to fp32 on load in the library;
    activations fp32; the hidden states returned in bf16 for the bf16 heads)."""

    def __init__(self, weights: FusedWeights, pool: BlockPool, library: ctypes.CDLL) -> None:
        config = weights.config
        if config.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"the C step handles head_dim <= {MAX_HEAD_DIM}, got "
                             f"{config.head_dim}")
        dtype = pool.kv.dtype
        if dtype not in (torch.float32, torch.bfloat16) or weights.embed.dtype != dtype:
            raise ValueError(f"the C step takes fp32 or bf16 weights and pool of one dtype, got "
                             f"{weights.embed.dtype} weights and a {dtype} pool")
        self.library, self.pool = library, pool
        self.bf16, self.dtype = dtype == torch.bfloat16, dtype
        self.gemm = library.qg_gemm_bf16 if self.bf16 else library.qg_gemm
        self.kept: list[torch.Tensor] = []  # fp32 copies of the small bf16 tensors it reads
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.hidden = config.head_dim, config.hidden_size
        self.intermediate = config.intermediate_size
        self.eps = float(config.rms_norm_eps)
        self.embed = weights.embed
        self.cos, self.sin = self._fp32(weights.cos), self._fp32(weights.sin)  # [positions, 1, D]
        self.final_norm = self._fp32(weights.final_norm)
        # Each layer's key and value pools: kv[layer, 0] and kv[layer, 1], [blocks, KV, page, D].
        base = pointer(pool.kv, dtype)
        pool_bytes = pool.kv[0, 0].numel() * pool.kv.element_size()
        self.kv = [(base + 2 * index * pool_bytes, base + (2 * index + 1) * pool_bytes)
                   for index in range(len(weights.layers))]
        # Each layer's norms and projections as the library reads them ([out, in] weights): one C
        # call per layer for one row (GEMVs), qg_gemm per projection for more rows.
        self.single = [(self._fp32(w.input_norm), pointer(w.qkv, dtype), self._fp32(w.qk_norm),
                        pointer(w.o, dtype), self._fp32(w.post_norm), pointer(w.gate_up, dtype),
                        pointer(w.down, dtype))
                       for w in weights.layers]
        widths = (self.hidden, self.hidden, self.hidden,
                  (self.heads + 2 * self.kv_heads) * self.head_dim,
                  self.heads * self.head_dim, self.heads * self.head_dim,
                  2 * self.intermediate, self.intermediate)
        self.widths = widths
        self.scratch: tuple[torch.Tensor, ...] = ()  # grown to the largest step seen
        floats = (2 * self.hidden + (self.heads + 2 * self.kv_heads) * self.head_dim
                  + 2 * self.heads * self.head_dim + 3 * self.intermediate)
        self.layer_scratch = torch.empty(floats, dtype=torch.float32)
        self.threads = 0  # set in the library at the first call

    def _fp32(self, tensor: torch.Tensor) -> int:
        """The address of `tensor` in fp32 (a kept copy when it is bf16: norms, RoPE tables)."""
        if tensor.dtype != torch.float32:
            tensor = tensor.float().contiguous()
            self.kept.append(tensor)
        return pointer(tensor)

    @torch.inference_mode()  # the scratch tensors are inference tensors, written in place
    def __call__(self, token_ids: torch.Tensor, meta: HostMeta,
                 threads: int | None = None) -> torch.Tensor:
        """token_ids [rows] (CPU int64) with their metadata -> final hidden [rows, hidden].
        `threads`: the library pool's threads (default: torch's thread count)."""
        rows = token_ids.shape[0]
        threads = threads or torch.get_num_threads()
        if threads != self.threads:
            self.library.qg_set_threads(threads)
            self.threads = threads
        tensors = self._buffers(rows)
        x = tensors[0]
        if self.bf16:
            x.copy_(self.embed.index_select(0, token_ids))
        else:
            torch.index_select(self.embed, 0, token_ids, out=x)
        if rows == 1:
            self._one_token(x.data_ptr(), meta)
        else:
            self._rows(rows, tensors, meta)
        hidden = torch.empty_like(x)
        self.library.qg_rms_norm(x.data_ptr(), self.final_norm, hidden.data_ptr(), rows,
                                 self.hidden, self.eps)
        return hidden.to(self.dtype)

    def _one_token(self, x: int, meta: HostMeta) -> None:
        """One C call per layer; x (the residual stream's address) updated in place."""
        lib, scratch, page = self.library, self.layer_scratch.data_ptr(), self.pool.block_size
        table, position = _address(meta.tables), meta.positions[0]
        for (input_norm, qkv, qk_norm, o, post_norm, gate_up, down), (keys, values) in \
                zip(self.single, self.kv):
            if lib.qg_decode_layer(x, input_norm, qkv, qk_norm, self.cos, self.sin, keys, values,
                                   table, page, position, o, post_norm, gate_up, down,
                                   self.heads, self.kv_heads, self.head_dim, self.hidden,
                                   self.intermediate, self.eps, scratch, self.bf16):
                raise _out_of_memory(position + 1)

    def _rows(self, rows: int, tensors: tuple[torch.Tensor, ...], meta: HostMeta) -> None:
        """The layers over `rows` packed rows, every part in the library (the projections as
        qg_gemm over the [out, in] weights); the result is left in tensors[0]."""
        lib, dim, hidden, inter = self.library, self.head_dim, self.hidden, self.intermediate
        gemm, bf16 = self.gemm, self.bf16
        x, x_next, normed, qkv, q, attended, gate_up, act = (t.data_ptr() for t in tensors)
        positions, slots, tables = _address(meta.positions), _address(meta.slots), \
            _address(meta.tables)
        q_start, q_len, ctx_len = _address(meta.q_start), _address(meta.q_len), \
            _address(meta.ctx_len)
        sessions, page = len(meta.q_len), self.pool.block_size
        qkv_width, q_width = (self.heads + 2 * self.kv_heads) * dim, self.heads * dim
        for (input_norm, qkv_w, qk_norm, o_w, post_norm, gate_up_w, down_w), (keys, values) in \
                zip(self.single, self.kv):
            lib.qg_rms_norm(x, input_norm, normed, rows, hidden, self.eps)
            gemm(normed, qkv_w, None, qkv, rows, hidden, qkv_width)
            lib.qg_qk_rope_store(qkv, qk_norm, self.cos, self.sin, positions, slots, q, keys,
                                 values, page, rows, self.heads, self.kv_heads, dim, self.eps,
                                 bf16)
            if lib.qg_attend_paged(q, keys, values, tables, meta.width, page, q_start, q_len,
                                   ctx_len, sessions, self.heads, self.kv_heads, dim, attended,
                                   bf16):
                raise _out_of_memory(max(meta.ctx_len))
            gemm(attended, o_w, x, x_next, rows, q_width, hidden)  # + the residual
            lib.qg_rms_norm(x_next, post_norm, normed, rows, hidden, self.eps)
            gemm(normed, gate_up_w, None, gate_up, rows, hidden, 2 * inter)
            lib.qg_silu_mul(gate_up, act, rows, inter)
            gemm(act, down_w, x_next, x, rows, inter, hidden)  # + the residual

    def _buffers(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Scratch views for `rows` rows (the buffers grow to the largest step seen)."""
        if not self.scratch or self.scratch[0].shape[0] < rows:
            self.scratch = tuple(torch.empty(rows, width, dtype=torch.float32)
                                 for width in self.widths)
        return tuple(t[:rows] for t in self.scratch)


class CpuHead:
    """One guard path's probabilities for hidden rows on the host, in the library
    (qg_guard_head): FastHead's formula (its fused weights, not copies), one C call instead of
    eight torch ops; with MKL's kernels gone cold after a batched step's K/V stream, the torch
    head took 0.5 ms of a 32-session step. fp32 or bf16 weights (bf16 read as the projections
    read theirs); the arithmetic is fp32 and so are the probabilities."""

    DTYPES = (torch.float32, torch.bfloat16)

    @classmethod
    def takes(cls, head: FastHead) -> bool:
        """Whether the library computes this head: fp32 or bf16 weights, both of one dtype."""
        return head.pre_t.dtype in cls.DTYPES and head.scores_t.dtype == head.pre_t.dtype

    def __init__(self, head: FastHead, library: ctypes.CDLL) -> None:
        if not self.takes(head):
            raise ValueError(f"the C guard head takes fp32 or bf16 weights, got "
                             f"{head.pre_t.dtype} and {head.scores_t.dtype}")
        self.library, self.bf16 = library, head.pre_t.dtype == torch.bfloat16
        self.pre = head.pre_t.t()  # [inner, hidden], the module's own (contiguous) weight
        self.scores = head.scores_t.t()  # [risk + categories, inner]
        self.norm = head.norm.float().contiguous()
        self.eps = float(head.eps)
        self.num_risk = head.num_risk
        if not (self.pre.is_contiguous() and self.scores.is_contiguous()):
            raise ValueError("the C guard head reads [out, in] weights in row-major order")
        self.scratch = torch.empty(0)

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [k, hidden_size] on the CPU (fp32, or bf16: widened exactly) ->
        (risk_probs [k, R], category_probs [k, C]) fp32."""
        rows, (inner, width) = hidden.shape[0], (self.pre.shape[0], self.scores.shape[0])
        hidden = hidden.float().contiguous()
        if self.scratch.numel() < 2 * rows * inner:
            self.scratch = torch.empty(2 * rows * inner, dtype=torch.float32)
        probs = torch.empty(rows, width, dtype=torch.float32)
        scratch = self.scratch.data_ptr()
        self.library.qg_guard_head(hidden.data_ptr(), self.pre.data_ptr(), self.norm.data_ptr(),
                                   self.scores.data_ptr(), scratch, scratch + 4 * rows * inner,
                                   probs.data_ptr(), rows, hidden.shape[1], inner, width,
                                   self.num_risk, self.eps, self.bf16)
        return probs[:, :self.num_risk], probs[:, self.num_risk:]


def _out_of_memory(positions: int) -> MemoryError:
    return MemoryError(f"the C attention could not allocate scores for {positions} positions")
