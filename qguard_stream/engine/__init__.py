"""Batched engine: many sessions, one forward per step, KV from one paged block pool."""

from qguard_stream.engine.async_engine import AsyncEngine
from qguard_stream.engine.engine import Engine, SessionBusyError, settle_heap
from qguard_stream.engine.scheduler import Session
from qguard_stream.engine.settings import EngineSettings, EngineStats, StepStats
from qguard_stream.kvcache.paged import (
    BlockPool,
    BlockTable,
    PoolExhaustedError,
    PoolTooSmallError,
)

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
    "settle_heap",
]
