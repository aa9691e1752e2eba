"""The weights a decode step reads, prepared once from the reference model: q/k/v and gate/up
fused into one matrix each (the modules' weights become views, so memory is not doubled and the
on-disk names stay), q_norm and k_norm stacked with the attention scale folded into q_norm's
weight, and RoPE tables for every position. Owns no session state and runs no step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from qguard_stream.config import GuardConfig
from qguard_stream.models.qwen3 import Backbone


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

    # The projections as [in, out] views, taken once: torch.mm/addmm on them skip F.linear's
    # linear -> t -> matmul dispatch chain, which costs more than a decode-size GEMM's arithmetic.
    @cached_property
    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv.t(), self.o.t(), self.gate_up.t(), self.down.t()


def fuse_layers(backbone: Backbone, config: GuardConfig) -> list[FusedLayer]:
    """Fuse each layer's projections; re-point the modules' weights at views of the fused ones."""
    scale = config.head_dim**-0.5
    fused = []
    for layer in backbone.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = fuse_linears(mlp.gate_proj, mlp.up_proj)
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        qk_norm = torch.cat((attn.q_norm.weight.expand(heads, -1) * scale,
                             attn.k_norm.weight.expand(kv_heads, -1)))
        fused.append(FusedLayer(layer.input_layernorm.weight, qkv, qk_norm, attn.o_proj.weight,
                                layer.post_attention_layernorm.weight, gate_up,
                                mlp.down_proj.weight))
    return fused


def fuse_linears(*linears: nn.Linear) -> torch.Tensor:
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
    freqs = positions.float()[:, None] * inv_freq[None, :]  # same ops as models.qwen3.Rotary
    angles = torch.cat((freqs, freqs), dim=-1)
    half = config.head_dim // 2
    sin = angles.sin()
    sin[:, :half] = -sin[:, :half]  # rotate_half(x) = roll(x, half) * [-1.., +1..]
    return angles.cos().to(dtype), sin.to(dtype)


class FusedWeights:
    """Everything a decode step reads, prepared once: fused layer weights, RoPE tables, the
    embedding and the final norm. Every step of the paged runner (torch, Triton, CUDA graphs, C)
    reads these."""

    def __init__(self, backbone: Backbone, config: GuardConfig) -> None:
        self.config = config
        self.embed = backbone.embed_tokens.weight
        self.final_norm = backbone.norm.weight
        self.layers = fuse_layers(backbone, config)
        cos, sin = rope_tables(config, backbone.rotary.inv_freq, self.embed.dtype)
        # [positions, 1, head_dim]: a step's rows broadcast over the heads with one slice.
        self.cos, self.sin = cos[:, None, :], sin[:, None, :]
        self.key_positions = torch.arange(config.max_position_embeddings,
                                          device=self.embed.device)
        self.eps = torch.tensor(config.rms_norm_eps, dtype=torch.float32,
                                device=self.embed.device)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.hidden = config.head_dim, config.hidden_size
        self.qk_width = (self.heads + self.kv_heads) * self.head_dim
