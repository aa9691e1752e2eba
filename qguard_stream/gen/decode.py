"""Batched greedy decoding for the causal LM: many sequences, one forward per step.

Sequences are left-padded into one KV buffer per layer ([batch, kv_heads, capacity, head_dim]).
Each row keeps its own positions (0 at its first real token) and never attends to padding, so a
row decodes exactly as it would alone (up to float rounding of the batched matmuls). Pad queries
attend to themselves only, which keeps their (discarded) outputs finite. Rows that have finished
keep stepping with their last token until every row is done; their extra tokens are dropped.
The layers' weights are the Backbone's own; this module only batches the same computation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qguard_stream.gen.causal_lm import CausalLM
from qguard_stream.models.qwen3 import Attention, Backbone, apply_rotary


class BatchKV:
    """Left-padded KV buffers of a decoding batch, plus which columns hold real tokens."""

    def __init__(self, lm: CausalLM, pad: torch.Tensor, capacity: int) -> None:
        c, weight = lm.config, lm.model.embed_tokens.weight
        shape = (pad.shape[0], c.num_key_value_heads, capacity, c.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in range(c.num_hidden_layers)]
        self.values = [weight.new_zeros(shape) for _ in range(c.num_hidden_layers)]
        columns = torch.arange(capacity, device=pad.device)
        self.real = columns[None, :] >= pad[:, None]  # [batch, capacity]
        self.pad = pad


def batch_forward(backbone: Backbone, token_ids: torch.Tensor, kv: BatchKV,
                  start: int) -> torch.Tensor:
    """token_ids [B, T] in columns start..start+T-1; returns final hidden states [B, T, hidden]."""
    new = token_ids.shape[1]
    end = start + new
    x = backbone.embed_tokens(token_ids)
    columns = torch.arange(start, end, device=token_ids.device)
    positions = (columns[None, :] - kv.pad[:, None]).clamp(min=0)
    cos, sin = backbone.rotary(positions.reshape(-1), x.dtype)
    causal = columns[:, None] >= torch.arange(end, device=token_ids.device)[None, :]
    own = columns[:, None] == torch.arange(end, device=token_ids.device)[None, :]
    mask = (causal[None] & kv.real[:, None, :end]) | own[None]  # [B, T, end]
    for i, layer in enumerate(backbone.layers):
        h = layer.input_layernorm(x)
        x = x + _attention(layer.self_attn, h, (cos, sin), kv.keys[i], kv.values[i], start,
                           mask[:, None])
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return backbone.norm(x)


def _attention(attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               keys: torch.Tensor, values: torch.Tensor, start: int,
               mask: torch.Tensor) -> torch.Tensor:
    batch, new, _ = x.shape
    flat = batch * new
    q = attn.q_norm(attn.q_proj(x).view(flat, attn.num_heads, attn.head_dim))
    k = attn.k_norm(attn.k_proj(x).view(flat, attn.num_kv_heads, attn.head_dim))
    v = attn.v_proj(x).view(batch, new, attn.num_kv_heads, attn.head_dim)
    q = apply_rotary(q, *rope).view(batch, new, attn.num_heads, attn.head_dim)
    k = apply_rotary(k, *rope).view(batch, new, attn.num_kv_heads, attn.head_dim)
    end = start + new
    keys[:, :, start:end] = k.transpose(1, 2)
    values[:, :, start:end] = v.transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys[:, :, :end],
                                         values[:, :, :end], attn_mask=mask, enable_gqa=True)
    return attn.o_proj(out.transpose(1, 2).reshape(batch, new, -1))


@torch.inference_mode()
def batch_greedy_generate(lm: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                          stop_ids: frozenset[int]) -> list[list[int]]:
    """Greedy continuations of all prompts decoded together; same contract as greedy_generate."""
    device = lm.model.embed_tokens.weight.device
    lengths = [len(ids) for ids in prompts]
    width = max(lengths)
    budgets = [min(max_new_tokens, lm.config.max_position_embeddings - n) for n in lengths]
    steps = max(budgets)
    pad = torch.tensor([width - n for n in lengths], device=device)
    kv = BatchKV(lm, pad, width + steps)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.int64)
    rows: list[list[int]] = [[] for _ in prompts]
    done = [budget <= 0 for budget in budgets]
    tokens = ids
    for step in range(steps):
        start = 0 if step == 0 else width + step - 1
        hidden = batch_forward(lm.model, tokens if step == 0 else tokens[:, None], kv, start)
        tokens = lm.lm_head(hidden[:, -1]).float().argmax(-1)
        for row, token in enumerate(tokens.tolist()):  # one host sync per step
            if not done[row]:
                rows[row].append(token)
                done[row] = token in stop_ids or len(rows[row]) >= budgets[row]
        if all(done):
            break
    return rows
