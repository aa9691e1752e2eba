"""The paged KV pool: one tensor of fixed-size blocks shared by every session, plus block tables.

The one KV store of every path (StreamGuard sessions, the engine, Gen decoding). The pool is sized
by a memory budget (bytes or tokens), never by sessions x max length. A session's positions live
in the blocks of its BlockTable: position p sits in block `table[p // block_size]` at offset
`p % block_size` (its "slot" is block * block_size + offset). Inside a block the layout is
head-major, [kv_heads, block_size, head_dim], so one KV head's rows of a block are contiguous (the
CPU attention streams them; on the GPU a tile of keys is one contiguous read); every reader takes
the logical view [num_blocks, block_size, kv_heads, head_dim] from `layer()`. On the CPU the pool
is left uninitialized, so the operating system commits its pages only as blocks are first written
(nothing reads a slot before it is written), and freed blocks are reused last-freed first, so
resident memory follows the blocks in use, not the budget. This module owns the free list and the
slot arithmetic; it knows nothing of models, roles or verdicts.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from qguard_stream.config import GuardConfig


class PoolExhaustedError(RuntimeError):
    """The KV pool has too few free blocks for a request (nothing was allocated)."""


class PoolTooSmallError(PoolExhaustedError):
    """The request can never fit: it needs more blocks than the whole pool holds."""


BLOCK_TOKENS = 16  # tokens per block, by default on CUDA
# On the CPU, 64: the C attention reads one KV head's rows of a block as one contiguous run, and
# the hardware prefetchers restart at every block (this 2-core AMD EPYC, small shape, context
# 512: the attention of 32 sessions 16% faster than on blocks of 16, the engine step 10-16%).
CPU_BLOCK_TOKENS = 64


def default_block_size(device: torch.device | str) -> int:
    """Tokens per KV block when none is asked for: CPU_BLOCK_TOKENS on the CPU, else
    BLOCK_TOKENS."""
    return CPU_BLOCK_TOKENS if torch.device(device).type == "cpu" else BLOCK_TOKENS

# The default KV budget in GiB: on CUDA reserved when the pool is made; on the CPU only address
# space until blocks are written.
DEFAULT_KV_GB = {"cuda": 2.0, "cpu": 4.0}


def default_kv_gb(device: torch.device) -> float:
    """The default KV pool budget on `device` (GiB)."""
    return DEFAULT_KV_GB.get(torch.device(device).type, DEFAULT_KV_GB["cuda"])


def budget_tokens(sessions: int, length: int, block_size: int) -> int:
    """A `max_tokens` budget in which `sessions` sessions of `length` positions each fit, whole
    blocks each, with one spare block per session."""
    return sessions * (-(-length // block_size) + 1) * block_size


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


HUGE_PAGE = 2 * 2**20
HUGE_PAGES_ENV = "QGUARD_STREAM_HUGE_PAGES"
_MADV_HUGEPAGE = 14


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back a CPU tensor's not-yet-written memory with transparent huge pages
    (2 MiB) as it is first written; whether the advice was taken. The paged attention reads each
    block's rows of one head, 4 KiB at a time from scattered blocks: with 4 KiB pages nearly every
    such read missed the TLB (32 sessions x 512 positions of the small shape: the C attention 17%
    faster on huge pages). Only the whole huge pages inside the tensor are advised; a no-op off
    Linux, for tensors under 2 MiB, where the kernel refuses (THP "never"), or with
    QGUARD_STREAM_HUGE_PAGES=0 (where the kernel compacts memory to find a huge page, a
    memory-starved machine may stall the step that first writes a 2 MiB region)."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" \
            or os.environ.get(HUGE_PAGES_ENV, "1") == "0":
        return False
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    first = -(-begin // HUGE_PAGE) * HUGE_PAGE
    last = end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(first, last - first, _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


class BlockPool:
    """Fixed-size KV blocks: `kv[layer, 0|1]` is [num_blocks, kv_heads, block_size, head_dim]
    (keys, values); `layer(i)` gives them as [num_blocks, block_size, kv_heads, head_dim]."""

    @classmethod
    def for_budget(cls, config: GuardConfig, block_size: int, device: torch.device,
                   dtype: torch.dtype, kv_memory_gb: float | None = None,
                   max_tokens: int | None = None) -> BlockPool:
        """A pool of as many blocks as `kv_memory_gb` GiB or `max_tokens` positions hold."""
        blocks = blocks_for_budget(config, dtype, block_size, kv_memory_gb, max_tokens)
        return cls(config, blocks, block_size, device, dtype)

    def __init__(self, config: GuardConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        cpu = torch.device(device).type == "cpu"
        make = torch.empty if cpu else torch.zeros
        self.kv = make(config.num_hidden_layers, 2, num_blocks, config.num_key_value_heads,
                       block_size, config.head_dim, device=device, dtype=dtype)
        if cpu:
            advise_huge_pages(self.kv)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is taken first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values as [num_blocks, block_size, kv_heads, head_dim]
        views (strided: head-major in memory)."""
        return self.kv[index, 0].transpose(1, 2), self.kv[index, 1].transpose(1, 2)

    def write(self, index: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k, v [n, kv_heads, head_dim] at (blocks[i], offsets[i]) of layer `index`."""
        keys, values = self.layer(index)
        keys[blocks, offsets] = k
        values[blocks, offsets] = v

    def read(self, index: int, blocks: torch.Tensor, offsets: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at (blocks[i], offsets[i]) of layer `index`, [kv_heads, n, head_dim]."""
        keys, values = self.layer(index)
        return keys[blocks, offsets].transpose(0, 1), values[blocks, offsets].transpose(0, 1)

    def allocate(self, count: int) -> list[int]:
        """Take `count` blocks, or raise PoolExhaustedError taking none."""
        if count > len(self._free):
            raise PoolExhaustedError(
                f"KV pool exhausted: need {count} block(s) of {self.block_size} tokens, "
                f"{len(self._free)} of {self.num_blocks} free")
        taken = self._free[len(self._free) - count:]
        del self._free[len(self._free) - count:]
        return taken[::-1]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


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
        blocks, offsets = self.locate(start, end)
        return blocks * self.block_size + offsets

    def locate(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset in block) of every position in start..end-1 (CPU int64 tensors)."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(self.blocks, dtype=torch.int64)[positions // self.block_size]
        return blocks, positions % self.block_size


class LayerView:
    """One layer of one session's K/V in the pool, as the reference model (models/qwen3.py)
    reads it: `write` stores new K/V in the session's slots and returns its whole context
    gathered, [kv_heads, length, head_dim]. The table must already hold the new positions."""

    __slots__ = ("layer", "pool", "table")

    def __init__(self, pool: BlockPool, layer: int, table: BlockTable) -> None:
        self.pool, self.layer, self.table = pool, layer, table

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [new, kv_heads, head_dim] at positions start..; returns keys, values 0..end."""
        device, end = self.pool.kv.device, start + k.shape[0]
        blocks, offsets = self.table.locate(start, end)
        self.pool.write(self.layer, blocks.to(device), offsets.to(device), k, v)
        blocks, offsets = self.table.locate(0, end)
        return self.pool.read(self.layer, blocks.to(device), offsets.to(device))
