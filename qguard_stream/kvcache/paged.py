"""The paged KV pool: one tensor of fixed-size blocks shared by every session, plus block tables.

The pool is sized by a memory budget (bytes or tokens), never by sessions x max length. A session's
positions live in the blocks of its BlockTable: position p sits in slot
`table[p // block_size] * block_size + p % block_size` of the flat slot axis. This module owns the
free list and the slot arithmetic; it knows nothing of models, roles or verdicts.
"""

from __future__ import annotations

from collections import deque

import torch

from qguard_stream.config import GuardConfig


class PoolExhaustedError(RuntimeError):
    """The KV pool has too few free blocks for a request (nothing was allocated)."""


class PoolTooSmallError(PoolExhaustedError):
    """The request can never fit: it needs more blocks than the whole pool holds."""


def bytes_per_token(config: GuardConfig, dtype: torch.dtype) -> int:
    """KV bytes one position costs across all layers (keys and values)."""
    element = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * element


def blocks_for_budget(config: GuardConfig, dtype: torch.dtype, block_size: int,
                      kv_memory_gb: float | None, max_tokens: int | None) -> int:
    """Number of blocks that fit the budget: `kv_memory_gb` (GiB) or `max_tokens` positions."""
    if (kv_memory_gb is None) == (max_tokens is None):
        raise ValueError(f"give exactly one of kv_memory_gb ({kv_memory_gb!r}) and "
                         f"max_tokens ({max_tokens!r})")
    if max_tokens is not None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
        return -(-max_tokens // block_size)
    assert kv_memory_gb is not None
    if not kv_memory_gb > 0:
        raise ValueError(f"kv_memory_gb must be > 0, got {kv_memory_gb!r}")
    blocks = int(kv_memory_gb * 2**30) // (block_size * bytes_per_token(config, dtype))
    if blocks < 1:
        raise ValueError(f"kv_memory_gb={kv_memory_gb} holds less than one block of "
                         f"{block_size} tokens")
    return blocks


class BlockPool:
    """Fixed-size KV blocks: `kv[layer, 0|1]` is [num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(self, config: GuardConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv = torch.zeros(config.num_hidden_layers, 2, num_blocks * block_size,
                              config.num_key_value_heads, config.head_dim,
                              device=device, dtype=dtype)
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def allocate(self, count: int) -> list[int]:
        """Take `count` blocks, or raise PoolExhaustedError taking none."""
        if count > len(self._free):
            raise PoolExhaustedError(
                f"KV pool exhausted: need {count} block(s) of {self.block_size} tokens, "
                f"{len(self._free)} of {self.num_blocks} free")
        return [self._free.popleft() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class BlockTable:
    """The blocks holding one session's positions, in order."""

    __slots__ = ("block_size", "blocks")

    def __init__(self, block_size: int) -> None:
        self.blocks: list[int] = []
        self.block_size = block_size

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.block_size

    def blocks_needed(self, length: int) -> int:
        """Blocks to add so that `length` positions fit."""
        return max(0, -(-length // self.block_size) - len(self.blocks))

    def grow(self, pool: BlockPool, length: int) -> None:
        """Make room for `length` positions (all-or-nothing)."""
        self.blocks.extend(pool.allocate(self.blocks_needed(length)))

    def shrink(self, pool: BlockPool, length: int) -> None:
        """Return the blocks past `length` positions to the pool."""
        keep = -(-length // self.block_size)
        pool.release(self.blocks[keep:])
        del self.blocks[keep:]

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Flat slot index of every position in start..end-1 (a CPU int64 tensor)."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(self.blocks, dtype=torch.int64)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size
