"""The batched forward: many sessions' new-token chunks packed into one ragged batch.

Reuses the loaded GuardModel's modules (no weight copies). Projections, norms, MLPs and heads run
once over the packed tokens [T, hidden]; attention is ragged: new k/v are written to the pool slots
of each session's block table, then every session attends over its own context only.

Attention paths (no padding in either):
- flash-attn `flash_attn_varlen_func` (CUDA, fp16/bf16, when importable) over the packed contexts;
- SDPA fallback: one SDPA call per session over its gathered context. Per-session calls cost one
  kernel launch per session and layer, but give each session exactly the attention it would get
  alone (a packed block-diagonal mask would cost O(T x total context) memory instead).
Both gather each context from the pool once per layer (one index over all sessions).
This module does no scheduling and no bookkeeping of sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qguard_stream.kvcache.paged import BlockPool, BlockTable
from qguard_stream.models.guard import GuardModel
from qguard_stream.models.qwen3 import Attention, apply_rotary, causal_mask

try:  # optional GPU kernel
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


@dataclass(frozen=True)
class Chunk:
    """New tokens of one session: positions start..start+len(token_ids)-1, scored by `role`."""

    table: BlockTable
    start: int
    token_ids: torch.Tensor  # 1-D int64, CPU
    role: str


@dataclass(frozen=True)
class PackedBatch:
    """Device tensors describing one step's ragged batch."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T] pool slot of each new token
    context_slots: torch.Tensor  # [sum of context lengths] pool slots, session after session
    query_lengths: list[int]
    context_lengths: list[int]
    starts: list[int]
    cu_query: torch.Tensor  # [B+1] int32 prefix sums (flash-attn)
    cu_context: torch.Tensor  # [B+1] int32


def pack(chunks: list[Chunk], device: torch.device) -> PackedBatch:
    """Concatenate chunks and compute their slots (CPU work, then one copy per tensor)."""
    query_lengths = [chunk.token_ids.shape[0] for chunk in chunks]
    starts = [chunk.start for chunk in chunks]
    context_lengths = [s + n for s, n in zip(starts, query_lengths)]
    positions = torch.cat([torch.arange(s, e) for s, e in zip(starts, context_lengths)])
    write = torch.cat([c.table.slots(c.start, e) for c, e in zip(chunks, context_lengths)])
    context = torch.cat([c.table.slots(0, e) for c, e in zip(chunks, context_lengths)])

    def prefix(lengths: list[int]) -> torch.Tensor:
        return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(device, torch.int32)

    return PackedBatch(
        token_ids=torch.cat([c.token_ids for c in chunks]).to(device),
        positions=positions.to(device), write_slots=write.to(device),
        context_slots=context.to(device), query_lengths=query_lengths,
        context_lengths=context_lengths, starts=starts,
        cu_query=prefix(query_lengths), cu_context=prefix(context_lengths),
    )


def sdpa_ragged(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                batch: PackedBatch) -> torch.Tensor:
    """q [T, H, D]; keys/values [sum ctx, KV, D] packed per session -> [T, H, D]."""
    outputs = []
    for q_s, k_s, v_s, start in zip(q.split(batch.query_lengths),
                                    keys.split(batch.context_lengths),
                                    values.split(batch.context_lengths), batch.starts):
        new = q_s.shape[0]
        mask = causal_mask(start, new, q.device) if start else None
        out = F.scaled_dot_product_attention(
            q_s.transpose(0, 1)[None], k_s.transpose(0, 1)[None], v_s.transpose(0, 1)[None],
            attn_mask=mask, is_causal=start == 0 and new > 1, enable_gqa=True)
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)


def flash_ragged(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 batch: PackedBatch) -> torch.Tensor:
    """flash-attn varlen; its causal mask is aligned bottom-right, i.e. offset by each start."""
    return flash_attn_varlen_func(
        q, keys, values, batch.cu_query, batch.cu_context,
        max(batch.query_lengths), max(batch.context_lengths), causal=True)


def use_flash(q: torch.Tensor) -> bool:
    return (flash_attn_varlen_func is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16))


class ModelRunner:
    """Runs one batched forward over ragged chunks, writing their k/v into the pool."""

    def __init__(self, model: GuardModel, pool: BlockPool) -> None:
        self.model = model
        self.pool = pool
        self.device = model.model.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(risk_probs [k, R], category_probs [k, C]) in fp32 for every chunk, in order."""
        backbone = self.model.model
        batch = pack(chunks, self.device)
        x = backbone.embed_tokens(batch.token_ids)
        rope = backbone.rotary(batch.positions, x.dtype)
        for index, layer in enumerate(backbone.layers):
            attended = self._attention(layer.self_attn, layer.input_layernorm(x), rope, batch,
                                       index)
            x = x + attended
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self._heads(backbone.norm(x), chunks, batch)

    def _attention(self, attn: Attention, x: torch.Tensor, rope: tuple[torch.Tensor, ...],
                   batch: PackedBatch, layer_index: int) -> torch.Tensor:
        tokens, dim = x.shape[0], attn.head_dim
        q = attn.q_norm(attn.q_proj(x).view(tokens, attn.num_heads, dim))
        k = attn.k_norm(attn.k_proj(x).view(tokens, attn.num_kv_heads, dim))
        v = attn.v_proj(x).view(tokens, attn.num_kv_heads, dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        pool_keys, pool_values = self.pool.kv[layer_index, 0], self.pool.kv[layer_index, 1]
        pool_keys.index_copy_(0, batch.write_slots, k)
        pool_values.index_copy_(0, batch.write_slots, v)
        keys = pool_keys.index_select(0, batch.context_slots)
        values = pool_values.index_select(0, batch.context_slots)
        ragged = flash_ragged if use_flash(q) else sdpa_ragged
        return attn.o_proj(ragged(q, keys, values, batch).reshape(tokens, -1))

    def _heads(self, hidden: torch.Tensor, chunks: list[Chunk], batch: PackedBatch
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each role's head runs once over that role's rows; results are split back per chunk."""
        rows = hidden.split(batch.query_lengths)
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(chunks)
        for role in ("user", "assistant"):
            members = [i for i, chunk in enumerate(chunks) if chunk.role == role]
            if not members:
                continue
            risk, category = self.model.head(role)(torch.cat([rows[i] for i in members]))
            sizes = [batch.query_lengths[i] for i in members]
            for i, r, c in zip(members, risk.split(sizes), category.split(sizes)):
                results[i] = (r, c)
        return results  # type: ignore[return-value]
