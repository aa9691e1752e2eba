"""Greedy decoding for the causal LM on the paged runner: many sequences, continuously batched.

Every sequence is a block table into one paged pool (kvcache/paged.py), and every step is one step
of the paged runner (runtime/paged.py, the runner StreamGuard and the engine use) returning the
next-token logits after each sequence's last row (outputs.NextTokenLogits). A sequence joins the
running batch when the pool has blocks for its prompt plus its token budget (reserved when it
joins, so decoding never runs out of blocks mid-way), is prefilled in the step it joins, and leaves
the batch when it stops; the others keep decoding. Each sequence decodes as it would alone, up to
the float rounding of batched GEMMs. Decoding is greedy only: the Gen model is a classifier that
writes its verdict.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qguard_stream.gen.causal_lm import CausalLM
from qguard_stream.kvcache.paged import (
    BLOCK_TOKENS,
    BlockPool,
    BlockTable,
    PoolTooSmallError,
    blocks_for_budget,
    default_kv_gb,
)
from qguard_stream.runtime.outputs import NextTokenLogits
from qguard_stream.runtime.paged import Chunk, PagedRunner
from qguard_stream.runtime.weights import FusedWeights

MAX_STEP_TOKENS = 4096  # prompt tokens prefilled in one step (sequences past it join next step)


@dataclass
class _Sequence:
    index: int
    prompt: torch.Tensor  # int64 CPU
    limit: int  # total length it may reach
    table: BlockTable
    generated: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.prompt.shape[0] + len(self.generated)


class Decoder:
    """Greedy decoding of a causal LM over one paged pool of `kv_memory_gb` GiB (default: 2 on
    CUDA, 4 on the CPU), made at the first call; thread-safe (one generate at a time)."""

    def __init__(self, lm: CausalLM, kv_memory_gb: float | None = None,
                 use_cuda_graphs: bool | None = None) -> None:
        self.lm, self.config = lm, lm.config
        weight = lm.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.kv_memory_gb = default_kv_gb(self.device) if kv_memory_gb is None else kv_memory_gb
        blocks_for_budget(self.config, self.dtype, BLOCK_TOKENS, self.kv_memory_gb, None)
        self.use_cuda_graphs = use_cuda_graphs
        self.pool: BlockPool | None = None
        self.runner: PagedRunner | None = None
        self.lock = threading.Lock()

    def _runtime(self) -> tuple[BlockPool, PagedRunner]:
        if self.pool is None or self.runner is None:
            self.pool = BlockPool.for_budget(self.config, BLOCK_TOKENS, self.device, self.dtype,
                                             self.kv_memory_gb)
            weights = FusedWeights(self.lm.model, self.config)
            self.runner = PagedRunner(weights, NextTokenLogits(self.lm.lm_head.weight), self.pool,
                                      use_graphs=self.use_cuda_graphs, max_graph_tokens=64)
        return self.pool, self.runner

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: frozenset[int]) -> list[list[int]]:
        """Greedy continuation of every prompt; each list ends with its stop token when one was
        produced (at most max_new_tokens, never past max_position_embeddings)."""
        with self.lock:
            pool, runner = self._runtime()
            limit = self.config.max_position_embeddings
            waiting = deque(_Sequence(index, torch.tensor(list(ids), dtype=torch.int64),
                                      min(len(ids) + max_new_tokens, limit),
                                      BlockTable(pool.block_size))
                            for index, ids in enumerate(prompts))
            for sequence in waiting:  # refused before any block is taken
                need = sequence.table.blocks_needed(sequence.limit)
                if need > pool.num_blocks:
                    raise PoolTooSmallError(
                        f"sequence {sequence.index} may reach {sequence.limit} tokens, "
                        f"{need} KV blocks; the pool holds {pool.num_blocks} (raise "
                        f"kv_memory_gb)")
            results: list[list[int]] = [[] for _ in prompts]
            running: list[_Sequence] = []
            try:
                while waiting or running:
                    joining = self._admit(waiting, running, pool)
                    chunks = [Chunk(s.table, s.length - 1, s.prompt.new_tensor(s.generated[-1:]),
                                    "assistant") for s in running]
                    chunks += [Chunk(s.table, 0, s.prompt, "assistant") for s in joining]
                    running += joining
                    logits = runner.forward(chunks)
                    still = []
                    for sequence, row in zip(running, logits):
                        token = int(row.argmax())
                        sequence.generated.append(token)
                        if token in stop_ids or sequence.length >= sequence.limit:
                            results[sequence.index] = sequence.generated
                            sequence.table.shrink(pool, 0)
                        else:
                            still.append(sequence)
                    running = still
            finally:
                for sequence in (*running, *waiting):
                    sequence.table.shrink(pool, 0)
            return results

    @staticmethod
    def _admit(waiting: deque[_Sequence], running: list[_Sequence], pool: BlockPool
               ) -> list[_Sequence]:
        """Sequences joining this step: in order, while their blocks fit the pool and their
        prompts the step."""
        joining: list[_Sequence] = []
        tokens = 0
        while waiting:
            sequence = waiting[0]
            need = sequence.table.blocks_needed(sequence.limit)
            prompt = sequence.prompt.shape[0]
            if need > pool.free_blocks or (joining and tokens + prompt > MAX_STEP_TOKENS):
                break
            sequence.table.grow(pool, sequence.limit)
            joining.append(waiting.popleft())
            tokens += prompt
        return joining
