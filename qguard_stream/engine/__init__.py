"""Batched engine: many sessions, one forward per step, KV from one paged block pool."""

from qguard_stream.engine.block_pool import (
    BlockPool,
    BlockTable,
    PoolExhaustedError,
    PoolTooSmallError,
)
from qguard_stream.engine.engine import (
    AsyncEngine,
    Engine,
    EngineSettings,
    EngineStats,
    SessionBusyError,
    StepStats,
)
from qguard_stream.engine.scheduler import Session

__all__ = [
    "AsyncEngine",
    "BlockPool",
    "BlockTable",
    "Engine",
    "EngineSettings",
    "EngineStats",
    "PoolExhaustedError",
    "PoolTooSmallError",
    "Session",
    "SessionBusyError",
    "StepStats",
]
