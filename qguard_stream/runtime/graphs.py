"""DecodeRunner: shape-static steps for a few new tokens, captured as CUDA graphs and replayed.

A step of k <= 16 tokens is padded to a bucket (1, 2, 4, 8, 16) and run with every shape fixed:
token ids and the start position live in static device buffers, positions are computed on the
device, K/V are written with `index_copy_`, and attention reads the session's whole buffer under a
mask built on the device (or flash-attn's kernel with device-side sequence lengths). Padding tokens
write K/V past the real end, where nothing reads them before a later step overwrites them. A graph
bakes in the addresses of the session's KV buffer, so graphs are stored on the SessionCache and
dropped when it reallocates or closes. On the CPU (or with capture off) the same static step runs
eagerly, which is how the tests check it without a GPU. This module must not touch session
bookkeeping (lengths, token ids, verdicts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qguard_stream.kvcache.session import SessionCache
from qguard_stream.models.guard import GuardHead
from qguard_stream.runtime.attention import (
    flash_attn_with_kvcache,
    flash_available,
    grouped_attention,
)
from qguard_stream.runtime.fused import FastBackbone, rms_norm

BUCKETS = (1, 2, 4, 8, 16)
Probs = tuple[torch.Tensor, torch.Tensor]


def bucket_for(new: int) -> int | None:
    """The smallest bucket holding `new` tokens, or None when the step is too large."""
    return next((bucket for bucket in BUCKETS if bucket >= new), None)


class DecodeRunner:
    """Runs small steps with static shapes; replays a CUDA graph per (session buffer, bucket,
    role)."""

    def __init__(self, backbone: FastBackbone, heads: dict[str, GuardHead], capture: bool) -> None:
        if capture and backbone.embed.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, got device {backbone.embed.device}")
        self.backbone = backbone
        self.heads = heads
        self.capture = capture
        device = backbone.embed.device
        self.token_ids = torch.zeros(BUCKETS[-1], dtype=torch.int64, device=device)
        self.start = torch.zeros((), dtype=torch.int64, device=device)
        self.offsets = torch.arange(BUCKETS[-1], device=device)
        self.use_flash = flash_available(device)

    def step(self, token_ids: torch.Tensor, cache: SessionCache, start: int, role: str
             ) -> Probs | None:
        """Score `token_ids` (1-D, CPU) at start..; None when no bucket fits (then go eager)."""
        new = token_ids.shape[0]
        bucket = bucket_for(new)
        if bucket is None or start + bucket > cache.capacity:
            return None
        self.token_ids[:new].copy_(token_ids, non_blocking=True)
        self.start.fill_(start)
        if self.capture:
            risk, category = self._replay(cache, bucket, role)
        else:
            risk, category = self.static_step(cache.buffer, bucket, role)
        return risk[:new].clone(), category[:new].clone()

    def _replay(self, cache: SessionCache, bucket: int, role: str) -> Probs:
        key = (bucket, role)
        if key not in cache.graphs:
            cache.graphs[key] = self._capture(cache.buffer, bucket, role)
        graph, outputs = cache.graphs[key]
        graph.replay()
        return outputs

    def _capture(self, buffer: torch.Tensor, bucket: int, role: str
                 ) -> tuple[torch.cuda.CUDAGraph, Probs]:
        # Warm-up on a side stream (library handles, autotuning) as torch.cuda.graphs requires;
        # it computes the very step being asked for, so its K/V writes are the step's own.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.static_step(buffer, bucket, role)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.static_step(buffer, bucket, role)
        return graph, outputs

    def static_step(self, buffer: torch.Tensor, bucket: int, role: str) -> Probs:
        """The shape-static step over the static inputs; capturable (no host reads of device)."""
        fast = self.backbone
        positions = self.start + self.offsets[:bucket]
        x = F.embedding(self.token_ids[:bucket], fast.embed)
        cos = fast.cos.index_select(0, positions)
        sin = fast.sin.index_select(0, positions)

        def write_and_attend(kv: torch.Tensor, q: torch.Tensor,
                             new_kv: torch.Tensor) -> torch.Tensor:
            kv.index_copy_(2, positions, new_kv.permute(1, 2, 0, 3))
            return self._attend(q, kv[0], kv[1], positions)

        for layer, kv in zip(fast.layers, buffer):
            x = fast.layer(x, layer, kv, cos, sin, write_and_attend)
        hidden = rms_norm(x, fast.final_norm, fast.eps)
        return self.heads[role](hidden)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """q: [bucket, heads, dim] at `positions`; keys/values: the layer's whole buffer."""
        new, heads, dim = q.shape
        if self.use_flash:
            lengths = (positions[-1:] + 1).to(torch.int32)
            out = flash_attn_with_kvcache(q[None], keys.transpose(0, 1)[None],
                                          values.transpose(0, 1)[None], cache_seqlens=lengths,
                                          softmax_scale=1.0, causal=True)
            return out.view(new, heads * dim)
        key_positions = self.backbone.key_positions[:keys.shape[1]]
        future = key_positions[None, :] > positions[:, None]  # [bucket, capacity]
        return grouped_attention(q, keys, values, future)
