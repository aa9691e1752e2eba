"""Engine: many sessions scored by one batched forward per step, KV from one paged pool.

Sync front-end: `submit` queues a chunk (reserving its KV blocks) and returns a Future; `step` runs
one batched forward over the queued chunks; `moderate`/`moderate_many` do both. Thread-safe: one
lock guards sessions, pool and queue, and is held for the duration of a step.
Async front-end: AsyncEngine runs every engine call on one worker thread and steps in a background
task while requests are queued, so the event loop never blocks on the model.
A call that raises leaves its session as it was. Policies and callbacks run outside (after a step).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from qguard_stream.engine.block_pool import (
    BlockPool,
    BlockTable,
    PoolExhaustedError,
    PoolTooSmallError,
    blocks_for_budget,
)
from qguard_stream.engine.runner import Chunk, ModelRunner
from qguard_stream.engine.scheduler import Request, Scheduler, Session
from qguard_stream.stream import ROLES, StreamClosedError, StreamGuard, TokenIds, Verdicts

DEFAULT_MAX_TOKENS = 32768
EXHAUSTION_MODES = ("error", "wait")


class SessionBusyError(RuntimeError):
    """The session has queued chunks; the operation needs them scored first."""


@dataclass(frozen=True)
class EngineSettings:
    """Runtime settings. KV budget: `kv_memory_gb` (GiB) or `max_tokens`; neither means
    DEFAULT_MAX_TOKENS positions. When the pool is exhausted, `on_pool_exhausted="error"` raises
    PoolExhaustedError at once; "wait" waits up to `pool_wait_timeout_s` for blocks to be freed."""

    block_size: int = 16
    kv_memory_gb: float | None = None
    max_tokens: int | None = None
    max_batch_tokens: int = 8192
    on_pool_exhausted: str = "error"
    pool_wait_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.block_size < 1:
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


class Engine:
    """Batched scoring of many sessions over one paged KV pool."""

    def __init__(self, guard: StreamGuard, settings: EngineSettings | None = None) -> None:
        self.guard = guard
        self.settings = settings or EngineSettings()
        kv_memory_gb, max_tokens = self.settings.budget()
        num_blocks = blocks_for_budget(guard.config, guard.dtype, self.settings.block_size,
                                       kv_memory_gb, max_tokens)
        self.pool = BlockPool(guard.config, num_blocks, self.settings.block_size, guard.device,
                              guard.dtype)
        self.runner = ModelRunner(guard.model, self.pool)
        self.scheduler = Scheduler(self.settings.max_batch_tokens)
        self.sessions: dict[int, Session] = {}
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self._lock = threading.Condition(threading.RLock())
        self._tokens_scored = 0
        self._steps = 0

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str],
                        settings: EngineSettings | None = None,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> Engine:
        return cls(StreamGuard.from_pretrained(path_or_id, device, dtype), settings)

    # ---- sessions ---------------------------------------------------------------------------
    def open(self) -> Session:
        """A new, empty session (holds no blocks until fed)."""
        with self._lock:
            session = Session(BlockTable(self.pool.block_size))
            self.sessions[session.id] = session
            return session

    def close(self, session: Session) -> None:
        """Free the session's blocks and cancel its queued chunks (idempotent)."""
        with self._lock:
            if session.closed:
                return
            for request in self.scheduler.remove_session(session):
                request.future.set_exception(StreamClosedError(f"session {session.id} closed"))
            session.closed = True
            session.table.shrink(self.pool, 0)
            session.last_verdicts = None
            self.sessions.pop(session.id, None)
            self._lock.notify_all()

    def rollback(self, session: Session, length: int) -> None:
        """Keep the first `length` scored tokens; blocks past them go back to the pool."""
        with self._lock:
            self._check_open(session)
            if isinstance(length, bool) or not isinstance(length, int):
                raise TypeError(f"rollback length must be an int, got {length!r}")
            if not 0 <= length <= session.length:
                raise ValueError(f"cannot roll back to length {length}: the session holds "
                                 f"{session.length} tokens")
            if session.queued:
                raise SessionBusyError(f"session {session.id} has {session.queued} queued "
                                       f"chunk(s); roll back after they are scored")
            del session.token_ids[length:]
            session.reserved = length
            session.table.shrink(self.pool, length)
            session.last_verdicts = None
            self._lock.notify_all()

    # ---- scoring ----------------------------------------------------------------------------
    def submit(self, session: Session, token_ids: TokenIds, role: str,
               wait: bool | None = None) -> Future[Verdicts]:
        """Queue a chunk (reserving its KV blocks); the Future resolves at the step scoring it.
        `wait` overrides the settings' exhaustion mode (True: wait up to the timeout)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        ids = self.guard._validate_ids(token_ids)
        with self._lock:
            self._check_open(session)
            end = session.reserved + ids.shape[0]
            limit = self.guard.config.max_position_embeddings
            if end > limit:
                raise ValueError(f"feeding {ids.shape[0]} tokens to a session of "
                                 f"{session.reserved} would exceed max_position_embeddings={limit}")
            self._reserve(session, end, self._should_wait(wait))
            request = Request(session, session.reserved, ids, role)
            session.reserved, session.queued = end, session.queued + 1
            self.scheduler.add(request)
            return request.future

    def step(self) -> int:
        """Run one batched forward over queued chunks; returns how many chunks it scored."""
        with self._lock:
            batch = self.scheduler.next_batch()
            if not batch:
                return 0
            began = time.perf_counter()
            chunks = [Chunk(r.session.table, r.start, r.token_ids, r.role) for r in batch]
            try:
                scores = self.runner.forward(chunks)
            except Exception as error:
                for request in batch:
                    self._fail(request, error)
                raise
            for request, (risk_probs, category_probs) in zip(batch, scores):
                self._complete(request, risk_probs, category_probs)
            stats = StepStats(len(batch), sum(r.num_tokens for r in batch),
                              time.perf_counter() - began, self.pool.used_blocks,
                              self.pool.num_blocks)
            self._steps += 1
            self._tokens_scored += stats.tokens
        for listener in self.step_listeners:
            listener(stats)
        return len(batch)

    def moderate(self, session: Session, token_ids: TokenIds, role: str) -> Verdicts:
        """Score one chunk now (batched with whatever else is queued)."""
        future = self.submit(session, token_ids, role)
        return self._drain(future)

    def moderate_many(self, chunks: Sequence[tuple[Session, TokenIds, str]]) -> list[Verdicts]:
        """Score (session, token_ids, role) chunks together; a session may appear more than once
        (its chunks run in order). If one chunk is refused, those already queued still run."""
        futures: list[Future[Verdicts]] = []
        try:
            for session, token_ids, role in chunks:
                futures.append(self.submit(session, token_ids, role))
        finally:
            results = [self._drain(future) for future in futures]
        return results

    def has_queued(self) -> bool:
        with self._lock:
            return bool(self.scheduler.waiting)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(len(self.sessions), len(self.scheduler.waiting),
                               self.pool.used_blocks, self.pool.num_blocks, self.pool.block_size,
                               self._tokens_scored, self._steps)

    # ---- internals ----------------------------------------------------------------------------
    def _drain(self, future: Future[Verdicts]) -> Verdicts:
        while not future.done():
            self.step()
        return future.result()

    def _should_wait(self, wait: bool | None) -> bool:
        return self.settings.on_pool_exhausted == "wait" if wait is None else wait

    def _reserve(self, session: Session, end: int, wait: bool) -> None:
        """Grow the session's table to `end` positions, waiting for freed blocks if asked."""
        table = session.table
        if len(table.blocks) + table.blocks_needed(end) > self.pool.num_blocks:
            raise PoolTooSmallError(
                f"a session of {end} tokens needs more than the pool's {self.pool.num_blocks} "
                f"blocks of {self.pool.block_size} tokens")
        deadline = time.monotonic() + self.settings.pool_wait_timeout_s
        while True:
            try:
                table.grow(self.pool, end)
                return
            except PoolExhaustedError as error:
                remaining = deadline - time.monotonic()
                if not wait or remaining <= 0:
                    suffix = f" after waiting {self.settings.pool_wait_timeout_s}s" if wait else ""
                    raise PoolExhaustedError(f"{error}{suffix}") from None
                self._lock.wait(remaining)
                self._check_open(session)

    def _complete(self, request: Request, risk_probs: torch.Tensor,
                  category_probs: torch.Tensor) -> None:
        session = request.session
        positions = range(request.start, request.start + request.num_tokens)
        verdicts = self.guard._verdicts(request.role, positions, request.token_ids, risk_probs,
                                        category_probs)
        session.token_ids.extend(verdicts.token_ids)
        session.queued -= 1
        session.last_verdicts = verdicts
        request.future.set_result(verdicts)

    def _fail(self, request: Request, error: Exception) -> None:
        """Undo a failed chunk and every later chunk of its session; the session keeps what was
        scored before."""
        session = request.session
        later = self.scheduler.remove_session(session)
        for failed in (request, *later):
            if not failed.future.done():
                failed.future.set_exception(error)
        session.queued = 0
        session.reserved = session.length
        session.table.shrink(self.pool, session.length)
        self._lock.notify_all()

    @staticmethod
    def _check_open(session: Session) -> None:
        if not isinstance(session, Session):
            raise TypeError(f"expected an engine Session, got {type(session).__name__}")
        if session.closed:
            raise StreamClosedError(f"session {session.id} is closed; open a new one")


class AsyncEngine:
    """asyncio front-end: engine calls run on one worker thread; a background task steps while
    chunks are queued, so concurrent `moderate` calls share steps."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qguard-engine")
        self._wake: asyncio.Event | None = None
        self._freed: asyncio.Event | None = None
        self._stepper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> Session:
        return await self._call(self.engine.open)

    async def close(self, session: Session) -> None:
        await self._call(self.engine.close, session)
        self._events()[1].set()

    async def rollback(self, session: Session, length: int) -> None:
        await self._call(self.engine.rollback, session, length)
        self._events()[1].set()

    async def moderate(self, session: Session, token_ids: TokenIds, role: str) -> Verdicts:
        """Queue a chunk and await its verdicts (waits for pool space when so configured)."""
        future = await self._submit(session, token_ids, role)
        self._ensure_stepper()
        self._events()[0].set()
        return await asyncio.wrap_future(future)

    async def stats(self) -> EngineStats:
        return await self._call(self.engine.stats)

    async def aclose(self) -> None:
        """Stop the background stepper and the worker thread (sessions are left as they are)."""
        if self._stepper is not None:
            self._stepper.cancel()
            try:
                await self._stepper
            except asyncio.CancelledError:
                pass
            self._stepper = None
        self._worker.shutdown(wait=True)

    async def _submit(self, session: Session, token_ids: TokenIds, role: str
                      ) -> Future[Verdicts]:
        settings = self.engine.settings
        deadline = time.monotonic() + settings.pool_wait_timeout_s
        while True:
            try:
                return await self._call(self.engine.submit, session, token_ids, role, False)
            except PoolExhaustedError as error:
                remaining = deadline - time.monotonic()
                if settings.on_pool_exhausted != "wait" or isinstance(error, PoolTooSmallError):
                    raise
                if remaining <= 0:
                    raise PoolExhaustedError(
                        f"{error} after waiting {settings.pool_wait_timeout_s}s") from None
                freed = self._events()[1]
                freed.clear()
                try:  # poll too: a free may land between the refusal and clear()
                    await asyncio.wait_for(freed.wait(), min(remaining, 0.05))
                except asyncio.TimeoutError:
                    pass

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        loop = asyncio.get_running_loop()
        if self._wake is None or self._freed is None or self._loop is not loop:
            # first use, or reuse from a new event loop (events and tasks belong to one loop)
            self._wake, self._freed, self._loop = asyncio.Event(), asyncio.Event(), loop
            self._stepper = None
        return self._wake, self._freed

    def _ensure_stepper(self) -> None:
        self._events()
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.get_running_loop().create_task(self._step_forever())

    async def _step_forever(self) -> None:
        wake = self._events()[0]
        while True:
            await wake.wait()
            wake.clear()
            while await self._call(self._step_quietly) > 0:
                pass

    def _step_quietly(self) -> int:
        # A failed step already failed its requests' futures; keep serving the others.
        try:
            return self.engine.step()
        except Exception:  # noqa: BLE001 - the error went to the requests' futures
            return 1
