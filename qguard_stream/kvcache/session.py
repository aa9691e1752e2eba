"""Per-session KV storage: one preallocated buffer per conversation, grown in blocks.

The buffer is [layers, 2, kv_heads, capacity, head_dim]; positions past `capacity` never exist, so a
step writes k/v in place and attention reads a prefix view. Growth rounds up to whole blocks and at
least doubles, so a token-by-token stream reallocates O(log n) times. This module knows nothing of
heads, roles or verdicts.
"""

from __future__ import annotations

from typing import Any

import torch

BLOCK_TOKENS = 256


class LayerCache:
    """A view of one layer's k/v inside a session buffer."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys  # [kv_heads, capacity, head_dim]
        self.values = values

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store k/v ([new, kv_heads, head_dim]) at start..; return keys/values 0..start+new."""
        end = start + k.shape[0]
        self.keys[:, start:end] = k.transpose(0, 1)
        self.values[:, start:end] = v.transpose(0, 1)
        return self.keys[:, :end], self.values[:, :end]


class SessionCache:
    """The KV buffer of one conversation."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                 device: torch.device, dtype: torch.dtype, initial_tokens: int = BLOCK_TOKENS):
        self.shape = (num_layers, 2, num_kv_heads, head_dim)
        self.max_tokens = max_tokens
        self.device, self.dtype = device, dtype
        self.buffer = self._allocate(min(_round_up(initial_tokens), max_tokens))
        self.layers = self._views()
        # CUDA graphs captured against this buffer's addresses (see graphs.DecodeRunner).
        self.graphs: dict[tuple[int, str], Any] = {}

    @property
    def capacity(self) -> int:
        return self.buffer.shape[3]

    def ensure(self, tokens: int, keep: int) -> None:
        """Make room for `tokens` positions, preserving the first `keep`."""
        if tokens <= self.capacity:
            return
        grown = min(max(_round_up(tokens), 2 * self.capacity), self.max_tokens)
        buffer = self._allocate(grown)
        buffer[:, :, :, :keep] = self.buffer[:, :, :, :keep]
        self.buffer = buffer
        self.layers = self._views()
        self.graphs.clear()  # they point at the old buffer

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def _allocate(self, tokens: int) -> torch.Tensor:
        layers, pair, heads, dim = self.shape
        # Zeros, not empty: the static-shape step attends over the whole buffer under a mask,
        # and a masked NaN left in unwritten memory would still poison probs @ values.
        return torch.zeros(layers, pair, heads, tokens, dim, device=self.device, dtype=self.dtype)

    def _views(self) -> list[LayerCache]:
        return [LayerCache(layer[0], layer[1]) for layer in self.buffer]


def _round_up(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS) * BLOCK_TOKENS
