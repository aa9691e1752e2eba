"""Guarding a token iterator: `guard.watch(tokens, prompt=...)` and its async twin `guard.awatch`.

Each item of the source is one token id or a burst (a list / 1-D tensor of ids). Tokens are scored
as the assistant's response in one session; the consumer receives each token with its verdict. When
the policy (default: the official consecutive_unsafe rule) asks to stop, the watcher stops pulling
from the source and ends the iteration cleanly; the outcome is in `watch.result` (a WatchResult),
and with `raise_on_flag=True` a `FlaggedError` carrying the same result is raised instead.

holdback=N: a token is released to the consumer only once N later tokens have been scored, so a
flag withholds the unsafe span instead of leaking it. Whatever the holdback, the flagged token and
anything scored with or after it are never released (holdback=0 still withholds the flagged token;
holdback >= window - 1 withholds the whole flagged run).
Tokens still held when the source ends cleanly are released then. chunk=k: tokens are scored once k
are pending (a burst counts all its tokens), trading latency for fewer forwards.

The watcher does not close the source iterator (its owner does). It closes the session at the end
unless the caller passed its own `state`; after a flag the session still holds every scored token,
so a caller that keeps it can `guard.rollback(state, result.decision.start_position)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qguard_stream.hooks import Hooks, attach
from qguard_stream.policy import ConsecutiveUnsafe, Decision, Policy, TokenVerdict
from qguard_stream.template import im_end_id, split_prompt_ids

if TYPE_CHECKING:
    from qguard_stream.stream import StreamGuard, StreamState

TokenItem = int | Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class GuardedToken:
    """A token released to the consumer, with its verdict."""

    token_id: int
    verdict: TokenVerdict


@dataclass
class WatchResult:
    """What happened to a watched stream."""

    released: list[int] = field(default_factory=list)  # token ids given to the consumer
    withheld: list[int] = field(default_factory=list)  # scored but never released (after a flag)
    decision: Decision | None = None  # the stop decision; None when the stream ended clean
    decisions: list[Decision] = field(default_factory=list)  # every decision (incl. non-stopping)
    state: StreamState | None = None  # the session (closed unless the caller passed it)

    @property
    def flagged(self) -> bool:
        return self.decision is not None


class FlaggedError(RuntimeError):
    """Raised by a watch with raise_on_flag=True when the policy stops the stream."""

    def __init__(self, result: WatchResult) -> None:
        decision = result.decision
        assert decision is not None
        super().__init__(f"{decision.label} at position {decision.position} "
                         f"(token {decision.token_id}, {decision.category})")
        self.result = result


def feed_prompt(guard: StreamGuard, state: StreamState, prompt: TokenItem | None) -> None:
    if prompt is None:
        return
    im_end = im_end_id(guard.tokenizer, guard.config.eos_token_id)
    user, header = split_prompt_ids(item_ids(prompt), im_end)
    if user:
        guard.moderate(state, user, "user")
    if header:
        guard.moderate(state, header, "assistant")


def item_ids(item: TokenItem) -> list[int]:
    if isinstance(item, torch.Tensor):
        if item.dim() > 1:
            raise ValueError(f"a token burst must be 0-D or 1-D, got shape {tuple(item.shape)}")
        return [int(t) for t in item.reshape(-1).tolist()]
    if isinstance(item, bool):
        raise TypeError(f"token ids must be integers, got {item!r}")
    if isinstance(item, int):
        return [item]
    return list(item)  # the guard validates the values


class _Watcher:
    """The state machine shared by the sync and async iterators."""

    def __init__(self, guard: StreamGuard, prompt: TokenItem | None, policy: Policy | None,
                 holdback: int, chunk: int, state: StreamState | None, hooks: Hooks | None) -> None:
        for name, value, low in (("holdback", holdback, 0), ("chunk", chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a qguard_stream.policy.Policy, got {policy!r}")
        if state is not None:
            state.check_open()
        self.guard, self.holdback, self.chunk = guard, holdback, chunk
        self.prompt, self.policy, self.hooks = prompt, policy or ConsecutiveUnsafe(), hooks
        self.owns_state = state is None
        self.state = state
        self.pending: list[int] = []
        self.held: list[GuardedToken] = []
        self.result = WatchResult(state=state)

    def start(self) -> None:
        """Open the session (unless given), feed the prompt, attach the policy."""
        if self.state is None:
            self.state = self.result.state = self.guard.open_stream()
        try:
            feed_prompt(self.guard, self.state, self.prompt)
        except Exception:
            self.close()
            raise
        self.monitor = attach(self.state, self.policy, self.hooks)

    @property
    def stopped(self) -> bool:
        return self.result.decision is not None

    def push(self, item: TokenItem) -> list[GuardedToken]:
        self.pending.extend(item_ids(item))
        return self._score() if len(self.pending) >= self.chunk else []

    def finish(self) -> list[GuardedToken]:
        released = self._score() if self.pending else []
        if not self.stopped:
            released += self._release(len(self.held))
        return released

    def close(self) -> None:
        if self.owns_state and self.state is not None and not self.state.closed:
            self.guard.close_stream(self.state)

    def _score(self) -> list[GuardedToken]:
        """Score the pending ids. If moderate raises before scoring (pool full...), they stay
        pending; if it raises after (a callback), they are held like any scored tokens."""
        before = self.state.length
        try:
            self.guard.moderate(self.state, self.pending, "assistant")
        except Exception:
            if self.state.length != before:
                self.pending = []
                self._take_scored()
            raise
        self.pending = []
        return self._take_scored()

    def _take_scored(self) -> list[GuardedToken]:
        self.held += [GuardedToken(t.token_id, t) for t in self.monitor.last_tokens]
        self.result.decisions = list(self.monitor.decisions)
        decision = self.monitor.stop_decision
        if decision is not None:
            self.result.decision = decision
            self.result.withheld = [t.token_id for t in self.held]
            self.held = []
            return []
        return self._release(len(self.held) - self.holdback)

    def _release(self, count: int) -> list[GuardedToken]:
        if count <= 0:
            return []
        released, self.held = self.held[:count], self.held[count:]
        self.result.released += [t.token_id for t in released]
        return released


class _WatchBase:
    """What Watch and AsyncWatch share: the watcher, the source and the outcome."""

    def __init__(self, guard: StreamGuard, tokens: Iterable[TokenItem] | AsyncIterable[TokenItem],
                 *, prompt: TokenItem | None = None, policy: Policy | None = None,
                 holdback: int = 0, chunk: int = 1, raise_on_flag: bool = False,
                 state: StreamState | None = None, hooks: Hooks | None = None) -> None:
        self._watcher = _Watcher(guard, prompt, policy, holdback, chunk, state, hooks)
        self._tokens, self._raise = tokens, raise_on_flag

    @property
    def result(self) -> WatchResult:
        """The outcome: released and withheld tokens and every decision made."""
        return self._watcher.result


class Watch(_WatchBase):
    """Iterate to receive GuardedTokens; `result` is set when the iteration ends."""

    def __iter__(self) -> Iterator[GuardedToken]:
        watcher = self._watcher
        watcher.start()
        try:
            for item in self._tokens:
                yield from watcher.push(item)
                if watcher.stopped:
                    break
            else:
                yield from watcher.finish()
        finally:
            watcher.close()
        if self._raise and watcher.stopped:
            raise FlaggedError(watcher.result)


class AsyncWatch(_WatchBase):
    """The async twin of Watch: `async for token in guard.awatch(async_tokens, ...)`. The forward
    runs on the event loop's thread (it is short per token; wrap the source if that matters)."""

    def __aiter__(self) -> AsyncIterator[GuardedToken]:
        return self._run()

    async def _run(self) -> AsyncIterator[GuardedToken]:
        watcher = self._watcher
        watcher.start()
        try:
            async for item in self._tokens:
                for token in watcher.push(item):
                    yield token
                if watcher.stopped:
                    break
            else:
                for token in watcher.finish():
                    yield token
        finally:
            watcher.close()
        if self._raise and watcher.stopped:
            raise FlaggedError(watcher.result)
