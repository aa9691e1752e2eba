"""The lean forward: the backbone as one function over fused weights, for the per-token hot path.

Computes exactly what `models.qwen3.Backbone` computes (the reference stays the readable parity
oracle) with the per-call overhead cut: the fused weights of weights.py, RoPE read from tables, no
mask for a single token, no nn.Module dispatch, and K/V written into the session buffer in place.
On fp32 CPU, steps of up to 16 tokens go to the C step (cpu_step.py). Nothing in a step depends on
the context length on the host side. This module owns no session state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from qguard_stream.config import GuardConfig
from qguard_stream.kernels.cpu_step import load as cpu_step_library
from qguard_stream.models.guard import GuardHead
from qguard_stream.models.qwen3 import Backbone
from qguard_stream.runtime.attention import attend
from qguard_stream.runtime.cpu_step import MAX_TOKENS as CPU_STEP_TOKENS
from qguard_stream.runtime.cpu_step import CpuDecodeStep
from qguard_stream.runtime.weights import FusedLayer, FusedWeights, fuse_linears

# (one layer's K/V handle, opaque to the layer; q [new, heads, dim], the new k and v
# [new, 2, kv_heads, dim]) -> [new, heads*dim]
KVAttend = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Qwen3's RMSNorm (fp32 statistics, cast back, then scale) in five ops: F.rms_norm is a
    ~10-op composite on the CPU, and at decode sizes each op costs more than its arithmetic."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    inv_rms = torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()
    normed = x * inv_rms
    if normed.dtype != x.dtype:  # skip the no-op cast's dispatch in fp32
        normed = normed.to(x.dtype)
    return normed.mul_(weight)


class FastHead:
    """One guard path's probabilities for the eager step: the formula of
    kernels.reference.guard_head_reference with the risk and category heads fused into one GEMM
    (the modules' weights become views of it) and no winners (Verdicts finds them lazily)."""

    def __init__(self, head: GuardHead) -> None:
        self.pre_t = head.pre.weight.t()
        self.norm = head.layernorm.weight
        self.eps = torch.tensor(head.layernorm.eps, dtype=torch.float32, device=self.norm.device)
        self.num_risk = head.risk.weight.shape[0]
        self.scores_t = fuse_linears(head.risk, head.category).t()

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [k, hidden_size] -> (risk_probs [k, R], category_probs [k, C]), fp32."""
        inner = rms_norm(torch.mm(hidden, self.pre_t), self.norm, self.eps)
        logits = torch.mm(inner, self.scores_t)
        risk, category = logits[:, :self.num_risk], logits[:, self.num_risk:]
        return (torch.softmax(risk, -1, dtype=torch.float32),
                torch.softmax(category, -1, dtype=torch.float32))


def _cpu_step(fast: FastBackbone) -> CpuDecodeStep | None:
    """The C decode step for fp32 CPU weights, if kernels/cpu_step.c builds here."""
    if fast.embed.device.type != "cpu" or fast.embed.dtype != torch.float32:
        return None
    library = cpu_step_library()
    return CpuDecodeStep(fast, library) if library is not None else None


class FastBackbone(FusedWeights):
    """The backbone's forward over fused weights, writing K/V into a session buffer in place."""

    def __init__(self, backbone: Backbone, config: GuardConfig) -> None:
        super().__init__(backbone, config)
        self.cpu_step = _cpu_step(self)

    def __call__(self, token_ids: torch.Tensor, buffer: torch.Tensor, start: int) -> torch.Tensor:
        """token_ids: [new] on the device, at positions start..; buffer: the session's
        [layers, 2, kv_heads, capacity, head_dim] KV buffer. Returns final hidden [new, hidden]."""
        if self.cpu_step is not None and token_ids.shape[0] <= CPU_STEP_TOKENS:
            return self.cpu_step(token_ids, buffer, start)
        return self.forward(token_ids, buffer, start)

    def forward(self, token_ids: torch.Tensor, buffer: torch.Tensor, start: int) -> torch.Tensor:
        """The eager step (any device, dtype and step size); same contract as __call__."""
        new = token_ids.shape[0]
        x = F.embedding(token_ids, self.embed)
        cos, sin = self.cos[start:start + new], self.sin[start:start + new]
        # Per layer (prefix, slots): the K/V read (0..end) and the K/V written (start..end),
        # sliced once for every layer rather than indexed per layer.
        views = zip(buffer.narrow(3, 0, start + new), buffer.narrow(3, start, new))

        def write_and_attend(kv: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor,
                             new_kv: torch.Tensor) -> torch.Tensor:
            (keys, values), slots = kv
            slots.copy_(new_kv.permute(1, 2, 0, 3))
            return attend(q, keys, values, start, self.key_positions)

        for layer, kv in zip(self.layers, views):
            x = self.layer(x, layer, kv, cos, sin, write_and_attend)
        return rms_norm(x, self.final_norm, self.eps)

    def layer(self, x: torch.Tensor, w: FusedLayer, kv: Any, cos: torch.Tensor,
              sin: torch.Tensor, write_and_attend: KVAttend) -> torch.Tensor:
        """One decoder layer; `write_and_attend(kv, q, new_kv)` stores k/v, returns attention."""
        new, dim = x.shape[0], self.head_dim
        qkv_t, o_t, gate_up_t, down_t = w.transposed
        qkv = torch.mm(rms_norm(x, w.input_norm, self.eps), qkv_t)
        qk = qkv[:, :self.qk_width].view(new, self.heads + self.kv_heads, dim)
        normed = rms_norm(qk, w.qk_norm, self.eps)
        # RoPE written back into qkv, so the new k and v lie side by side: one cache write.
        torch.addcmul(normed * cos, normed.roll(dim // 2, -1), sin, out=qk)
        new_kv = qkv[:, self.heads * dim:].view(new, 2, self.kv_heads, dim)
        out = write_and_attend(kv, qk[:, :self.heads], new_kv)
        x = torch.addmm(x, out, o_t)  # the residual add fused into the GEMM
        gate, up = torch.mm(rms_norm(x, w.post_norm, self.eps), gate_up_t).chunk(2, dim=-1)
        return torch.addmm(x, F.silu(gate).mul_(up), down_t)
