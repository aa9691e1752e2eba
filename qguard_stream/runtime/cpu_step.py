"""The decode step for fp32 CPU sessions: the eager step's math (runtime/fused.py) in C.

One new token: each layer is one C call (qg_decode_layer: norms, the projections as C GEMVs,
q/k norm + RoPE + KV write, attention, SiLU), instead of ~45 eager ops. Two to MAX_TOKENS tokens:
per layer C RMSNorm -> torch.mm (qkv) -> C q/k norm + RoPE + KV write -> C attention (up to
C_ATTENTION_TOKENS new tokens; attention.attend beyond) -> torch.addmm (o_proj + residual) -> C
RMSNorm -> torch.mm (gate_up) -> C SiLU*up -> torch.addmm (down + residual), the GEMMs staying in
PyTorch's BLAS. Used when kernels/cpu_step.c builds on this machine (see
qguard_stream.kernels.cpu_step); longer steps and other devices or dtypes take the eager layers.
Scratch tensors are per thread and per step size, so sessions scored concurrently on different
threads never share them. This module owns no session state and no weights: it reads
weights.FusedWeights.
"""

from __future__ import annotations

import ctypes
import threading
from typing import NamedTuple

import torch

from qguard_stream.kernels.cpu_step import pointer
from qguard_stream.runtime.attention import attend
from qguard_stream.runtime.weights import FusedWeights

# Up to this many new tokens per step: the steps a stream makes. Longer ones (prompts) take the
# eager step, whose GEMMs and SDPA prefill are already compute-bound there.
MAX_TOKENS = 16
# Up to this many, the C attention; beyond, attention.attend (batched GEMMs), which wins once the
# queries are many enough to make the per-key dot products compute-bound (measured: at context
# 4096, 8 new tokens took 5.4 ms with the C attention and 4.7 ms eager).
C_ATTENTION_TOKENS = 4
MAX_HEAD_DIM = 1024  # cpu_step.c's stack row


class CpuDecodeStep:
    """FastBackbone's forward for fp32 CPU steps of up to MAX_TOKENS tokens, through `library`."""

    def __init__(self, fast: FusedWeights, library: ctypes.CDLL) -> None:
        config = fast.config
        if config.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"the C step handles head_dim <= {MAX_HEAD_DIM}, got "
                             f"{config.head_dim}")
        self.library = library
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.hidden = config.head_dim, config.hidden_size
        self.intermediate = config.intermediate_size
        self.eps = float(config.rms_norm_eps)
        self.embed = fast.embed
        self.key_positions = fast.key_positions
        self.cos, self.sin = pointer(fast.cos), pointer(fast.sin)  # [positions, 1, head_dim]
        self.final_norm = pointer(fast.final_norm)
        self.layers = [(pointer(w.input_norm), pointer(w.qk_norm), pointer(w.post_norm),
                        *w.transposed) for w in fast.layers]
        # One token: each layer is one C call (projections as C GEMVs over the [out, in] weights).
        self.single = [(pointer(w.input_norm), pointer(w.qkv), pointer(w.qk_norm), pointer(w.o),
                        pointer(w.post_norm), pointer(w.gate_up), pointer(w.down))
                       for w in fast.layers]
        self.scratch = threading.local()

    @torch.inference_mode()  # the scratch tensors are inference tensors, written in place
    def __call__(self, token_ids: torch.Tensor, buffer: torch.Tensor, start: int
                 ) -> torch.Tensor:
        """Same contract as FastBackbone.__call__: token_ids [new] (new <= MAX_TOKENS) at
        positions start..; buffer [layers, 2, kv_heads, capacity, head_dim], contiguous fp32.
        Returns the final hidden states [new, hidden]."""
        new, dim = token_ids.shape[0], self.head_dim
        capacity, base = buffer.shape[3], pointer(buffer)
        if start + new > capacity:  # C writes where it is told: never past the buffer
            raise ValueError(f"positions {start}..{start + new} exceed the KV buffer's capacity "
                             f"{capacity}")
        tensors, addresses = self._buffers(new)
        x = tensors[0]
        torch.index_select(self.embed, 0, token_ids, out=x)
        kv_bytes = self.kv_heads * capacity * dim * 4  # one layer's K (or V) block
        where = _Where(start, capacity * dim, kv_bytes, self.cos + start * dim * 4,
                       self.sin + start * dim * 4,
                       [base + 2 * index * kv_bytes for index in range(len(self.layers))])
        if new == 1:
            self._one_token(addresses[0], where)
        else:
            self._few_tokens(new, buffer, tensors, addresses, where)
        hidden = torch.empty_like(x)
        self.library.qg_rms_norm(addresses[0], self.final_norm, hidden.data_ptr(), new,
                                 self.hidden, self.eps)
        return hidden

    def _one_token(self, x: int, where: _Where) -> None:
        """One C call per layer; x (the residual stream's address) updated in place."""
        scratch = self._layer_scratch()
        for (input_norm, qkv, qk_norm, o, post_norm, gate_up, down), k_cache in \
                zip(self.single, where.k_caches):
            if self.library.qg_decode_layer(
                    x, input_norm, qkv, qk_norm, where.cos, where.sin, k_cache,
                    k_cache + where.kv_bytes, where.head_stride, where.start, o, post_norm,
                    gate_up, down, self.heads, self.kv_heads, self.head_dim, self.hidden,
                    self.intermediate, self.eps, scratch):
                raise _out_of_memory(where.start + 1)

    def _few_tokens(self, new: int, buffer: torch.Tensor, tensors: tuple[torch.Tensor, ...],
                    addresses: tuple[int, ...], where: _Where) -> None:
        """GEMMs in torch.mm, the rest in C; the result is left in tensors[0]."""
        lib, dim = self.library, self.head_dim
        x, x_next, normed, qkv, q, attended, gate_up, act = tensors
        x_p, x_next_p, normed_p, qkv_p, q_p, attended_p, gate_up_p, act_p = addresses
        for index, ((input_norm, qk_norm, post_norm, qkv_t, o_t, gate_up_t, down_t), k_cache) in \
                enumerate(zip(self.layers, where.k_caches)):
            v_cache = k_cache + where.kv_bytes
            lib.qg_rms_norm(x_p, input_norm, normed_p, new, self.hidden, self.eps)
            torch.mm(normed, qkv_t, out=qkv)
            lib.qg_qk_rope_store(qkv_p, qk_norm, where.cos, where.sin, q_p, k_cache, v_cache,
                                 where.head_stride, where.start, new, self.heads, self.kv_heads,
                                 dim, self.eps)
            if new > C_ATTENTION_TOKENS:
                prefix = buffer[index].narrow(2, 0, where.start + new)
                attended = attend(q.view(new, self.heads, dim), prefix[0], prefix[1],
                                  where.start, self.key_positions)
            elif lib.qg_attend(q_p, k_cache, v_cache, where.head_stride, where.start, new,
                               self.heads, self.kv_heads, dim, attended_p):
                raise _out_of_memory(where.start + new)
            torch.addmm(x, attended, o_t, out=x_next)  # the residual add fused into the GEMM
            lib.qg_rms_norm(x_next_p, post_norm, normed_p, new, self.hidden, self.eps)
            torch.mm(normed, gate_up_t, out=gate_up)
            lib.qg_silu_mul(gate_up_p, act_p, new, self.intermediate)
            torch.addmm(x_next, act, down_t, out=x)

    def _layer_scratch(self) -> int:
        """The address of this thread's scratch for qg_decode_layer."""
        scratch = getattr(self.scratch, "layer", None)
        if scratch is None:
            floats = (2 * self.hidden + (self.heads + 2 * self.kv_heads) * self.head_dim
                      + 2 * self.heads * self.head_dim + 3 * self.intermediate)
            scratch = self.scratch.layer = torch.empty(floats, dtype=torch.float32)
        return scratch.data_ptr()

    def _buffers(self, new: int) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
        """This thread's scratch for a step of `new` tokens (allocated once per size) and the
        tensors' addresses."""
        cached = getattr(self.scratch, "by_size", None)
        if cached is None:
            cached = self.scratch.by_size = {}
        buffers = cached.get(new)
        if buffers is None:
            widths = (self.hidden, self.hidden, self.hidden,
                      (self.heads + 2 * self.kv_heads) * self.head_dim,
                      self.heads * self.head_dim, self.heads * self.head_dim,
                      2 * self.intermediate, self.intermediate)
            tensors = tuple(torch.empty(new, width, dtype=torch.float32) for width in widths)
            buffers = cached[new] = (tensors, tuple(t.data_ptr() for t in tensors))
        return buffers


class _Where(NamedTuple):
    """Where a step reads and writes: positions, the KV buffer's layout, the RoPE rows."""

    start: int
    head_stride: int  # floats between two KV heads' rows (capacity * head_dim)
    kv_bytes: int  # bytes of one layer's K block (V follows it)
    cos: int  # address of the RoPE rows at `start`
    sin: int
    k_caches: list[int]  # each layer's K block address


def _out_of_memory(positions: int) -> MemoryError:
    return MemoryError(f"the C attention could not allocate scores for {positions} positions")
