"""The lean forward: the backbone as one function over fused weights, for the per-token hot path.

Computes exactly what `model.Backbone` computes (the core path stays the readable reference and the
parity oracle) with the per-call overhead cut: q/k/v and gate/up weights fused into one matrix each
(the modules' own q_proj/k_proj/... weights become views of the fused tensor, so memory is not
doubled and the on-disk names stay), q_norm and k_norm applied as one norm with the attention scale
folded into q_norm's weight, RoPE read from tables built once for every position, no mask for a
single token, no nn.Module dispatch, and K/V written into the session buffer in place. Nothing in a
step depends on the context length on the host side. This module owns no session state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qguard_stream.attention import attend
from qguard_stream.config import GuardConfig
from qguard_stream.model import Backbone

# (kv buffer of one layer, q [new, heads, dim], k and v [new, kv_heads, dim]) -> [new, heads*dim]
KVAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FusedLayer:
    """One decoder layer's weights, fused for the hot path."""

    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qk_norm: torch.Tensor  # [heads + kv_heads, head_dim]; q rows pre-multiplied by the scale
    o: torch.Tensor  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


def fuse_layers(backbone: Backbone, config: GuardConfig) -> list[FusedLayer]:
    """Fuse each layer's projections; re-point the modules' weights at views of the fused ones."""
    scale = config.head_dim**-0.5
    fused = []
    for layer in backbone.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = _fuse(mlp.gate_proj, mlp.up_proj)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        qk_norm = torch.cat((attn.q_norm.weight.expand(heads, -1) * scale,
                             attn.k_norm.weight.expand(kv_heads, -1)))
        fused.append(FusedLayer(layer.input_layernorm.weight, qkv, qk_norm, attn.o_proj.weight,
                                layer.post_attention_layernorm.weight, gate_up,
                                mlp.down_proj.weight))
    return fused


def _fuse(*linears: nn.Linear) -> torch.Tensor:
    """Concatenate Linear weights along the output dim; each Linear then holds a view of it."""
    whole = torch.cat([linear.weight.detach() for linear in linears])
    offset = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(whole[offset:offset + rows], requires_grad=False)
        offset += rows
    return whole


def rope_tables(config: GuardConfig, inv_freq: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin for every position: rope(x) = x*cos + roll(x, half)*sin."""
    positions = torch.arange(config.max_position_embeddings, device=inv_freq.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # same ops as model.Rotary
    angles = torch.cat((freqs, freqs), dim=-1)
    half = config.head_dim // 2
    sin = angles.sin()
    sin[:, :half] = -sin[:, :half]  # rotate_half(x) = roll(x, half) * [-1.., +1..]
    return angles.cos().to(dtype), sin.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Qwen3's RMSNorm (fp32 statistics, cast back, then scale) in five ops: F.rms_norm is a
    ~10-op composite on the CPU, and at decode sizes each op costs more than its arithmetic."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    inv_rms = torch.addcmul(eps, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()
    return (x * inv_rms).to(x.dtype) * weight


class FastBackbone:
    """The backbone's forward over fused weights, writing K/V into a session buffer in place."""

    def __init__(self, backbone: Backbone, config: GuardConfig) -> None:
        self.config = config
        self.embed = backbone.embed_tokens.weight
        self.final_norm = backbone.norm.weight
        self.layers = fuse_layers(backbone, config)
        self.cos, self.sin = rope_tables(config, backbone.rotary.inv_freq, self.embed.dtype)
        self.key_positions = torch.arange(config.max_position_embeddings,
                                          device=self.embed.device)
        self.eps = torch.tensor(config.rms_norm_eps, dtype=torch.float32,
                                device=self.embed.device)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.hidden = config.head_dim, config.hidden_size
        self.qk_width = (self.heads + self.kv_heads) * self.head_dim

    def __call__(self, token_ids: torch.Tensor, buffer: torch.Tensor, start: int) -> torch.Tensor:
        """token_ids: [new] on the device, at positions start..; buffer: the session's
        [layers, 2, kv_heads, capacity, head_dim] KV buffer. Returns final hidden [new, hidden]."""
        end = start + token_ids.shape[0]
        x = F.embedding(token_ids, self.embed)
        cos, sin = self.cos[start:end, None, :], self.sin[start:end, None, :]

        def write_and_attend(kv: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             v: torch.Tensor) -> torch.Tensor:
            kv[0, :, start:end] = k.transpose(0, 1)
            kv[1, :, start:end] = v.transpose(0, 1)
            return attend(q, kv[0, :, :end], kv[1, :, :end], start, self.key_positions)

        for layer, kv in zip(self.layers, buffer):
            x = self.layer(x, layer, kv, cos, sin, write_and_attend)
        return rms_norm(x, self.final_norm, self.eps)

    def layer(self, x: torch.Tensor, w: FusedLayer, kv: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, write_and_attend: KVAttend) -> torch.Tensor:
        """One decoder layer; `write_and_attend(kv, q, k, v)` stores k/v and returns attention."""
        new, dim = x.shape[0], self.head_dim
        qkv = F.linear(rms_norm(x, w.input_norm, self.eps), w.qkv)
        qk = qkv[:, :self.qk_width].view(new, self.heads + self.kv_heads, dim)
        qk = rms_norm(qk, w.qk_norm, self.eps)
        qk = torch.addcmul(qk * cos, qk.roll(dim // 2, -1), sin)
        v = qkv[:, self.qk_width:].view(new, self.kv_heads, dim)
        out = write_and_attend(kv, qk[:, :self.heads], qk[:, self.heads:], v)
        x = x + F.linear(out, w.o)
        gate, up = F.linear(rms_norm(x, w.post_norm, self.eps), w.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w.down)
