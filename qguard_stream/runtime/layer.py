"""One decoder layer for every fused path, with the KV operation passed in.

`decoder_layer(x, w, norm, attend, act)`: RMSNorm -> the fused q/k/v projection -> `attend(qkv)`
(q/k norm, RoPE, the K/V write and attention, whatever the cache) -> o_proj with the residual
fused into the GEMM -> RMSNorm -> gate/up -> `act` (SiLU * up) -> down with the residual. The
paged runner (paged.py: StreamGuard, the engine and Gen decoding) calls it with the torch ops of
this module or the Triton ones of kernels/decode_ops.py; cpu_step.py runs the same sequence with
the non-GEMM ops in C. FastHead is the guard head over fused weights. The module-by-module model
(models/) stays the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from qguard_stream.models.guard import GuardHead
from qguard_stream.runtime.weights import FusedLayer, fuse_linears

NormFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, weight) -> normed x
AttendFn = Callable[[torch.Tensor], torch.Tensor]  # qkv [T, (H + 2 KV) D] -> [T, H D]
ActFn = Callable[[torch.Tensor], torch.Tensor]  # gate_up [T, 2 I] -> [T, I]


def decoder_layer(x: torch.Tensor, w: FusedLayer, norm: NormFn, attend: AttendFn,
                  act: ActFn) -> torch.Tensor:
    """One Qwen3 decoder layer over the rows of x [T, hidden]."""
    qkv_t, o_t, gate_up_t, down_t = w.transposed
    qkv = torch.mm(norm(x, w.input_norm), qkv_t)
    x = torch.addmm(x, attend(qkv), o_t)  # the residual add fused into the GEMM
    return torch.addmm(x, act(torch.mm(norm(x, w.post_norm), gate_up_t)), down_t)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Qwen3's RMSNorm (fp32 statistics, cast back, then scale) in five ops: F.rms_norm is a
    ~10-op composite on the CPU, and at decode sizes each op costs more than its arithmetic."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    inv_rms = torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()
    normed = x * inv_rms
    if normed.dtype != x.dtype:  # skip the no-op cast's dispatch in fp32
        normed = normed.to(x.dtype)
    return normed.mul_(weight)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [T, 2 I], gate first."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def qk_norm_rope(qkv: torch.Tensor, qk_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 eps: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k heads of qkv RMS-normed with their qk_norm rows and rotated (cos/sin [T, 1, D]); the
    result is written back into qkv, so the new k and v lie side by side. Returns (q [T, H, D],
    new_kv [T, 2, KV, D]), both views of qkv."""
    rows, dim = qkv.shape[0], qk_norm.shape[-1]
    qk = qkv[:, :(heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
    normed = rms_norm(qk, qk_norm, eps)
    torch.addcmul(normed * cos, normed.roll(dim // 2, -1), sin, out=qk)
    return qk[:, :heads], qkv[:, heads * dim:].view(rows, 2, kv_heads, dim)


class FastHead:
    """One guard path's probabilities on the hot path: the formula of
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
