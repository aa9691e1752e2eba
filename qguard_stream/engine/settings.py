"""Engine runtime settings and the per-step / per-engine statistics it reports.

Frozen dataclasses, validated where they are built; no behaviour beyond that.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 32768
EXHAUSTION_MODES = ("error", "wait")


@dataclass(frozen=True)
class EngineSettings:
    """Runtime settings. KV budget: `kv_memory_gb` (GiB) or `max_tokens`; neither means
    DEFAULT_MAX_TOKENS positions. When the pool is exhausted, `on_pool_exhausted="error"` raises
    PoolExhaustedError at once; "wait" waits up to `pool_wait_timeout_s` for blocks to be freed.
    On CUDA, steps of up to `max_graph_tokens` tokens (every chunk <= 16 tokens) replay CUDA graphs
    captured when the engine is built (`use_cuda_graphs=False`: always eager). `block_size`:
    tokens per KV block (None: 16 on CUDA, 64 on the CPU, kvcache.paged.default_block_size); a
    multiple of 256 lets flash-attn (when installed, fp16/bf16 on CUDA) read the pool in place
    for chunks past 16 tokens, where smaller blocks gather them."""

    block_size: int | None = None
    kv_memory_gb: float | None = None
    max_tokens: int | None = None
    max_batch_tokens: int = 8192
    on_pool_exhausted: str = "error"
    pool_wait_timeout_s: float = 10.0
    max_graph_tokens: int = 256
    use_cuda_graphs: bool | None = None

    def __post_init__(self) -> None:
        if self.max_graph_tokens < 1:
            raise ValueError(f"max_graph_tokens must be >= 1, got {self.max_graph_tokens}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_memory_gb is not None and self.max_tokens is not None:
            raise ValueError(f"give kv_memory_gb ({self.kv_memory_gb}) or max_tokens "
                             f"({self.max_tokens}), not both")
        if self.on_pool_exhausted not in EXHAUSTION_MODES:
            raise ValueError(f"on_pool_exhausted must be one of {EXHAUSTION_MODES}, "
                             f"got {self.on_pool_exhausted!r}")
        if not self.pool_wait_timeout_s >= 0:
            raise ValueError(f"pool_wait_timeout_s must be >= 0, got {self.pool_wait_timeout_s}")

    def budget(self) -> tuple[float | None, int | None]:
        if self.kv_memory_gb is None and self.max_tokens is None:
            return None, DEFAULT_MAX_TOKENS
        return self.kv_memory_gb, self.max_tokens


@dataclass(frozen=True)
class StepStats:
    """What one step did; passed to step listeners (metrics) after the step."""

    sessions: int
    tokens: int
    seconds: float
    used_blocks: int
    total_blocks: int


@dataclass(frozen=True)
class EngineStats:
    active_sessions: int
    queued_requests: int
    used_blocks: int
    total_blocks: int
    block_size: int
    tokens_scored: int
    steps: int
