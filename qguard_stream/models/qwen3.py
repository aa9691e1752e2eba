"""The Qwen3 backbone as plain PyTorch modules with Hugging Face names: the readable reference.

Module and parameter names mirror the checkpoint (`model.layers.3.self_attn.q_proj.weight`, ...) so
loading is a name lookup. The backbone scores one sequence's new tokens against that sequence's KV
cache; it owns no cache and does no bookkeeping. The runtime (qguard_stream.runtime) computes the
same function faster; this module stays the parity oracle and the source of the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qguard_stream.config import GuardConfig


class LayerCache(Protocol):
    """One layer of one sequence's KV cache (kvcache.paged.LayerView is the one we ship)."""

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v ([new, kv_heads, head_dim]) at start..; return keys/values
        [kv_heads, start + new, head_dim]."""
        ...


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalise in fp32, cast back, then scale (same order as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary(nn.Module):
    """Rotate-half RoPE; cos/sin for any positions computed on the fly from inv_freq."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # On the CPU, then moved: arithmetic on the meta device (where the loader builds the
        # model) runs torch's Python references, which import torch._dynamo (2.5 s, 75 MB).
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = (1.0 / (theta**exponent)).to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def causal_mask(start: int, new: int, device: torch.device) -> torch.Tensor | None:
    """Mask for `new` queries at positions start.. against keys 0..start+new-1 (None if not
    needed)."""
    if new == 1:
        return None
    query_pos = torch.arange(start, start + new, device=device)[:, None]
    key_pos = torch.arange(start + new, device=device)[None, :]
    return key_pos <= query_pos


class Attention(nn.Module):
    def __init__(self, config: GuardConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, dim = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, self.num_heads * dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * dim, hidden, bias=False)
        self.q_norm = RMSNorm(dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LayerCache, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        new = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(new, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(new, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(new, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        keys, values = cache.write(start, k, v)  # [kv_heads, start+new, head_dim]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
            is_causal=start == 0 and new > 1, enable_gqa=True,
        )
        return self.o_proj(out[0].transpose(0, 1).reshape(new, -1))


class MLP(nn.Module):
    def __init__(self, config: GuardConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: GuardConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LayerCache, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Qwen3Model: embeddings, decoder layers, final norm. Weights live under `model.` on disk."""

    def __init__(self, config: GuardConfig) -> None:
        super().__init__()
        # nn.Embedding's own init (normal_) on the meta device, where the loader builds the model
        # before filling it, imports torch._dynamo like Rotary's arithmetic would: the table is
        # made empty and drawn here only off the meta device.
        table = torch.empty(config.vocab_size, config.hidden_size)
        if table.device.type != "meta":
            nn.init.normal_(table)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config.head_dim, config.rope_theta)

    def forward(self, token_ids: torch.Tensor, caches: Sequence[LayerCache],
                start: int) -> torch.Tensor:
        """token_ids: [T] at positions start..start+T-1; returns final hidden states [T, hidden]."""
        x = self.embed_tokens(token_ids)
        positions = torch.arange(start, start + token_ids.shape[0], device=token_ids.device)
        rope = self.rotary(positions, x.dtype)
        mask = causal_mask(start, token_ids.shape[0], x.device) if start else None
        for layer, cache in zip(self.layers, caches):
            x = layer(x, rope, cache, start, mask)
        return self.norm(x)
