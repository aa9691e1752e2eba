"""AsyncEngine: the asyncio front-end of Engine.

Every engine call runs on one worker thread (so the event loop never blocks on the model or the
engine lock) and a background task steps while chunks are queued, so concurrent `moderate` calls
share batched steps. Waiting for pool space, when configured, happens here on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from qguard_stream.engine.engine import Engine
from qguard_stream.engine.scheduler import Session
from qguard_stream.engine.settings import EngineStats
from qguard_stream.kvcache.paged import PoolExhaustedError, PoolTooSmallError
from qguard_stream.verdicts import TokenIds, Verdicts


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
        except Exception:
            return 1
