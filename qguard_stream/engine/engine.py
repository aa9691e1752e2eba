"""Engine: many sessions scored by one batched forward per step, KV from one paged pool.

`submit` queues a chunk (reserving its KV blocks) and returns a Future; `step` runs one batched
forward over the queued chunks; `moderate`/`moderate_many` do both. Thread-safe: one lock guards
sessions, pool and queue, and is held for the duration of a step. The asyncio front-end is
async_engine.AsyncEngine.
A call that raises leaves its session as it was. Policies and callbacks run outside (after a step).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from qguard_stream.engine.scheduler import Request, Scheduler, Session
from qguard_stream.engine.settings import EngineSettings, EngineStats, StepStats
from qguard_stream.kvcache.paged import (
    BlockPool,
    BlockTable,
    PoolExhaustedError,
    PoolTooSmallError,
    default_block_size,
)
from qguard_stream.runtime.outputs import GuardScores, Probs
from qguard_stream.runtime.paged import Chunk, PagedRunner
from qguard_stream.runtime.weights import FusedWeights
from qguard_stream.stream import StreamGuard
from qguard_stream.verdicts import (
    ForeignSessionError,
    StreamClosedError,
    TokenIds,
    Verdicts,
    build_verdicts,
    check_role,
    validate_token_ids,
)


def settle_heap() -> None:
    """For a long-running server, once its model and engine are built: collect garbage, then
    exempt every object alive (the model, the tokenizer, the imported modules: ~220k objects)
    from the garbage collector's full passes. A batched step's futures and verdicts live through
    young collections, so a full pass came about every 20 steps and walked them all: 216 ms each
    (256 sessions, CPU), 10.8 ms a step on average. Process-wide: the frozen objects are still
    freed by reference counting, but a reference cycle among them is never collected, so this is
    for a process's startup objects, not a library call."""
    gc.collect()
    gc.freeze()


class SessionBusyError(RuntimeError):
    """The session has queued chunks; the operation needs them scored first."""


class Engine:
    """Batched scoring of many sessions over one paged KV pool."""

    def __init__(self, guard: StreamGuard, settings: EngineSettings | None = None) -> None:
        self.guard = guard
        self.settings = settings or EngineSettings()
        kv_memory_gb, max_tokens = self.settings.budget()
        block_size = self.settings.block_size or default_block_size(guard.device)
        self.pool = BlockPool.for_budget(guard.config, block_size, guard.device, guard.dtype,
                                         kv_memory_gb, max_tokens)
        weights = guard.fast or FusedWeights(guard.model.model, guard.config)
        heads = {"user": guard.model.query, "assistant": guard.model.response}
        self.runner = PagedRunner(weights, GuardScores(heads), self.pool,
                                  use_graphs=self.settings.use_cuda_graphs,
                                  max_graph_tokens=self.settings.max_graph_tokens)
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
            session = Session(BlockTable(self.pool.block_size), owner=self)
            self.sessions[session.id] = session
            return session

    def close(self, session: Session) -> None:
        """Free the session's blocks and cancel its queued chunks (idempotent)."""
        with self._lock:
            self._check_owner(session)
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
        check_role(role)
        ids = validate_token_ids(token_ids, self.guard.config.vocab_size)
        with self._lock:
            start = self._reserve_chunk(session, ids, self._should_wait(wait))
            request = Request(session, start, ids, role)
            session.queued += 1
            self.scheduler.add(request)
            return request.future

    def step(self) -> int:
        """Run one batched forward over queued chunks; returns how many chunks it took. A failure
        goes to the futures of the chunks it concerns (and their sessions' later chunks), never
        out of step(), so a caller draining the queue never receives another session's error."""
        with self._lock:
            batch = self.scheduler.next_batch()
            if not batch:
                return 0
            began = time.perf_counter()
            chunks = [Chunk(r.session.table, r.start, r.token_ids, r.role) for r in batch]
            try:
                scores = self.runner.forward(chunks)
            except Exception as error:  # each chunk's future gets it; no caller gets another's
                for request in batch:
                    self._fail(request, error)
                return len(batch)
            failed: dict[int, Exception] = {}
            for request, probs in zip(batch, scores):
                if request.session.id in failed:  # an earlier chunk of its session failed
                    if not request.future.done():
                        request.future.set_exception(failed[request.session.id])
                    continue
                try:
                    self._complete(request, probs)
                except Exception as error:  # e.g. NonFiniteScoresError: this session only
                    failed[request.session.id] = error
                    self._fail(request, error)
            tokens = sum(chunk.token_ids.shape[0] for chunk in chunks)
            self._steps += 1
            self._tokens_scored += tokens
            stats = StepStats(len(batch), tokens, time.perf_counter() - began,
                              self.pool.used_blocks, self.pool.num_blocks) \
                if self.step_listeners else None
        if stats is not None:
            for listener in self.step_listeners:
                listener(stats)
        return len(batch)

    def moderate(self, session: Session, token_ids: TokenIds, role: str) -> Verdicts:
        """Score one chunk now (batched with whatever else is queued). With nothing queued and
        no step listeners it runs at once in the caller, a step of one chunk without the
        queue's round trip (Future, scheduler), as a lone StreamGuard session does (unless it
        must wait for blocks: then it is queued)."""
        with self._lock:
            if not self.scheduler.waiting and not self.step_listeners:
                scored = self._score_now([(session, token_ids, role)])
                if scored is not None:
                    return scored[0]
        future = self.submit(session, token_ids, role)
        return self._drain(future)

    def moderate_many(self, chunks: Sequence[tuple[Session, TokenIds, str]]) -> list[Verdicts]:
        """Score (session, token_ids, role) chunks together; a session may appear more than once
        (its chunks run in order). If one chunk is refused, those before it still run. With
        nothing queued, no step listeners and each session once, they run at once in the
        caller, like a lone chunk in `moderate` (no Future per chunk)."""
        chunks = list(chunks)
        with self._lock:
            if not self.scheduler.waiting and not self.step_listeners and \
                    len({id(session) for session, _, _ in chunks}) == len(chunks):
                scored = self._score_now(chunks)
                if scored is not None:
                    return scored
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
    def _score_now(self, chunks: Sequence[tuple[Session, TokenIds, str]]
                   ) -> list[Verdicts] | None:
        """Chunks of distinct sessions scored now, in steps within the token budget (the caller
        holds the lock and nothing is queued). As when they are queued: a refused chunk (bad
        ids, no room) stops the list, those before it are still scored, then it raises; a chunk
        whose scoring fails leaves its session as it was, the others are recorded, then the
        first failure raises. None, with nothing done, when a chunk would have to wait for
        blocks: the lock is released while waiting, and only queued chunks are guarded then
        (their sessions refuse a rollback, a close cancels them), so the caller queues them."""
        reserved: list[tuple[Session, Chunk]] = []
        refused: Exception | None = None
        for session, token_ids, role in chunks:
            try:
                check_role(role)
                ids = validate_token_ids(token_ids, self.guard.config.vocab_size)
                start = self._reserve_chunk(session, ids, wait=False)
            except PoolExhaustedError as error:
                if self._should_wait(None):
                    for session, chunk in reversed(reserved):
                        self._unreserve(session, chunk.start)
                    return None
                refused = error
                break
            except Exception as error:
                refused = error
                break
            reserved.append((session, Chunk(session.table, start, ids, role)))
        results: list[Verdicts] = []
        failure: Exception | None = None
        for first, last in self._steps_of(reserved):
            step = reserved[first:last]
            try:
                scores = self.runner.forward([chunk for _, chunk in step])
            except BaseException:
                for session, chunk in reserved[first:]:  # unscored: back as they were
                    self._unreserve(session, chunk.start)
                raise
            for (session, chunk), probs in zip(step, scores):
                try:
                    results.append(self._record(session, chunk.role, chunk.start,
                                                chunk.token_ids, probs))
                except Exception as error:  # e.g. NonFiniteScoresError: this session only
                    self._unreserve(session, chunk.start)
                    failure = failure or error
            self._steps += 1
            self._tokens_scored += sum(chunk.token_ids.shape[0] for _, chunk in step)
        if refused is not None:
            raise refused
        if failure is not None:
            raise failure
        return results

    def _steps_of(self, reserved: list[tuple[Session, Chunk]]) -> list[tuple[int, int]]:
        """[first, last) ranges of consecutive chunks within the token budget (an oversized
        chunk alone)."""
        if sum(chunk.token_ids.shape[0] for _, chunk in reserved) <= \
                self.settings.max_batch_tokens:
            return [(0, len(reserved))] if reserved else []
        ranges, first, tokens = [], 0, 0
        for index, (_, chunk) in enumerate(reserved):
            size = chunk.token_ids.shape[0]
            if index > first and tokens + size > self.settings.max_batch_tokens:
                ranges.append((first, index))
                first, tokens = index, 0
            tokens += size
        if first < len(reserved):
            ranges.append((first, len(reserved)))
        return ranges

    def _unreserve(self, session: Session, start: int) -> None:
        """Give back a session's reservation from `start` (its chunk was not recorded)."""
        session.reserved = start
        session.table.shrink(self.pool, start)
        self._lock.notify_all()

    def _reserve_chunk(self, session: Session, ids: torch.Tensor, wait: bool) -> int:
        """Reserve the blocks of `ids` after the session's reserved positions, waiting for freed
        blocks if asked; returns where the chunk starts. The start is read again after each wait
        (the lock is released meanwhile, and another thread may have fed, rolled back or closed
        the session), so two chunks never get the same positions."""
        deadline = time.monotonic() + self.settings.pool_wait_timeout_s
        limit = self.guard.config.max_position_embeddings
        while True:
            self._check_open(session)
            table, start = session.table, session.reserved
            end = start + ids.shape[0]
            if end > limit:
                raise ValueError(f"feeding {ids.shape[0]} tokens to a session of {start} would "
                                 f"exceed max_position_embeddings={limit}")
            if end > table.capacity:  # else its blocks hold it already (most tokens)
                if len(table.blocks) + table.blocks_needed(end) > self.pool.num_blocks:
                    raise PoolTooSmallError(
                        f"a session of {end} tokens needs more than the pool's "
                        f"{self.pool.num_blocks} blocks of {self.pool.block_size} tokens")
                try:
                    table.grow(self.pool, end)
                except PoolExhaustedError as error:
                    remaining = deadline - time.monotonic()
                    if not wait or remaining <= 0:
                        suffix = (f" after waiting {self.settings.pool_wait_timeout_s}s"
                                  if wait else "")
                        raise PoolExhaustedError(f"{error}{suffix}") from None
                    self._lock.wait(remaining)
                    continue
            session.reserved = end
            return start

    def _drain(self, future: Future[Verdicts]) -> Verdicts:
        while not future.done():
            self.step()
        return future.result()

    def _should_wait(self, wait: bool | None) -> bool:
        return self.settings.on_pool_exhausted == "wait" if wait is None else wait

    def _complete(self, request: Request, probs: Probs) -> None:
        verdicts = self._record(request.session, request.role, request.start, request.token_ids,
                                probs)
        request.session.queued -= 1
        request.future.set_result(verdicts)

    def _record(self, session: Session, role: str, start: int, ids: torch.Tensor,
                probs: Probs) -> Verdicts:
        """The chunk's verdicts, its tokens appended to the session (NonFiniteScoresError
        before anything changes)."""
        risk_probs, category_probs = probs
        verdicts = build_verdicts(self.guard.config, role, start, ids, risk_probs,
                                  category_probs, checked=probs.finite)
        session.token_ids.extend(verdicts.token_ids)
        session.last_verdicts = verdicts
        return verdicts

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

    def _check_open(self, session: Session) -> None:
        self._check_owner(session)
        if session.closed:
            raise StreamClosedError(f"session {session.id} is closed; open a new one")

    def _check_owner(self, session: Session) -> None:
        if not isinstance(session, Session):
            raise TypeError(f"expected an engine Session, got {type(session).__name__}")
        if session.owner is not self:
            raise ForeignSessionError(
                f"session {session.id} was opened by another Engine; a session can only be used "
                f"with the engine whose open() made it")
