"""The decode step for fp32 CPU sessions: FastBackbone's math with the non-GEMM work in C.

Per layer: C RMSNorm -> torch.mm (qkv) -> C q/k norm + RoPE + KV write -> C attention (up to
C_ATTENTION_TOKENS new tokens; attention.attend beyond) -> torch.addmm (o_proj + residual) -> C
RMSNorm -> torch.mm (gate_up) -> C SiLU*up -> torch.addmm (down + residual): nine calls instead of
~45 eager ops, the GEMMs staying in PyTorch's BLAS. Used for steps of up to MAX_TOKENS new tokens
when kernels/cpu_step.c builds on this machine (see qguard_stream.kernels.cpu_step); longer steps
and other devices or dtypes take FastBackbone's eager layers. Scratch tensors are per thread and
per step size, so sessions scored concurrently on different threads never share them. This module
owns no session state and no weights: it reads FastBackbone's.
"""

from __future__ import annotations

import ctypes
import threading
from typing import TYPE_CHECKING

import torch

from qguard_stream.attention import attend
from qguard_stream.kernels.cpu_step import pointer

if TYPE_CHECKING:
    from qguard_stream.fastpath import FastBackbone

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

    def __init__(self, fast: FastBackbone, library: ctypes.CDLL) -> None:
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
        lib, new, dim = self.library, token_ids.shape[0], self.head_dim
        (x, x_next, normed, qkv, q, attended, gate_up, act), addresses = self._buffers(new)
        x_p, x_next_p, normed_p, qkv_p, q_p, attended_p, gate_up_p, act_p = addresses
        capacity, base = buffer.shape[3], pointer(buffer)
        if start + new > capacity:  # C writes where it is told: never past the buffer
            raise ValueError(f"positions {start}..{start + new} exceed the KV buffer's capacity "
                             f"{capacity}")
        torch.index_select(self.embed, 0, token_ids, out=x)
        if new == 1:
            return self._single(x, base, capacity, start)
        head_stride = capacity * dim
        kv_bytes = self.kv_heads * head_stride * 4
        rope_offset = start * dim * 4
        cos, sin = self.cos + rope_offset, self.sin + rope_offset
        for index, (input_norm, qk_norm, post_norm, qkv_t, o_t, gate_up_t, down_t) in \
                enumerate(self.layers):
            k_cache = base + 2 * index * kv_bytes
            lib.qg_rms_norm(x_p, input_norm, normed_p, new, self.hidden, self.eps)
            torch.mm(normed, qkv_t, out=qkv)
            lib.qg_qk_rope_store(qkv_p, qk_norm, cos, sin, q_p, k_cache, k_cache + kv_bytes,
                                 head_stride, start, new, self.heads, self.kv_heads, dim, self.eps)
            if new > C_ATTENTION_TOKENS:
                prefix = buffer[index].narrow(2, 0, start + new)
                attended = attend(q.view(new, self.heads, dim), prefix[0], prefix[1], start,
                                  self.key_positions)
            elif lib.qg_attend(q_p, k_cache, k_cache + kv_bytes, head_stride, start, new,
                               self.heads, self.kv_heads, dim, attended_p):
                raise MemoryError(f"the C attention could not allocate scores for {start + new} "
                                  "positions")
            torch.addmm(x, attended, o_t, out=x_next)  # the residual add fused into the GEMM
            lib.qg_rms_norm(x_next_p, post_norm, normed_p, new, self.hidden, self.eps)
            torch.mm(normed, gate_up_t, out=gate_up)
            lib.qg_silu_mul(gate_up_p, act_p, new, self.intermediate)
            torch.addmm(x_next, act, down_t, out=x)
        hidden = torch.empty_like(x)
        lib.qg_rms_norm(x_p, self.final_norm, hidden.data_ptr(), new, self.hidden,
                        self.eps)
        return hidden

    def _single(self, x: torch.Tensor, base: int, capacity: int, start: int) -> torch.Tensor:
        """The one-token step: a C call per layer, x updated in place."""
        lib, dim = self.library, self.head_dim
        head_stride = capacity * dim
        kv_bytes = self.kv_heads * head_stride * 4
        cos, sin = self.cos + start * dim * 4, self.sin + start * dim * 4
        x_p, scratch = x.data_ptr(), self._layer_scratch()
        for index, (input_norm, qkv, qk_norm, o, post_norm, gate_up, down) in \
                enumerate(self.single):
            k_cache = base + 2 * index * kv_bytes
            if lib.qg_decode_layer(x_p, input_norm, qkv, qk_norm, cos, sin, k_cache,
                                   k_cache + kv_bytes, head_stride, start, o, post_norm, gate_up,
                                   down, self.heads, self.kv_heads, dim, self.hidden,
                                   self.intermediate, self.eps, scratch):
                raise MemoryError(f"the C attention could not allocate scores for {start + 1} "
                                  "positions")
        hidden = torch.empty_like(x)
        lib.qg_rms_norm(x_p, self.final_norm, hidden.data_ptr(), 1, self.hidden, self.eps)
        return hidden

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

