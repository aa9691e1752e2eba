"""Detect, roll back, regenerate (the CARE loop of the Qwen3Guard report) on one guard session.

`care_generate(guard, generate, prompt=..., checkpoint_every=M, max_retries=R)` calls
`generate(prefix, attempt)` for tokens (attempt 0 is the first generation; `prefix` is the accepted
response so far) and scores them as the assistant's response. A clean checkpoint is kept every M
response tokens. When the policy stops the stream, the session is rolled back with `guard.rollback`
(no re-prefill: the kept KV cache is reused) to the last checkpoint at or before the first token of
the flagged run, and `generate` is called again from that prefix. After R retries that all get
flagged, the loop gives up with the response cut back to the last clean checkpoint.

The result reports every attempt: the tokens it produced, its decision, the checkpoint it was rolled
back to. This module does not sample tokens itself and holds nothing back from a live consumer; use
watch(holdback=...) for that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qguard_stream.hooks import Hooks, attach
from qguard_stream.integrations.watch import TokenItem, feed_prompt, item_ids
from qguard_stream.policy import ConsecutiveUnsafe, Decision, Policy

if TYPE_CHECKING:
    from qguard_stream.stream import StreamGuard, StreamState

RegenerateFn = Callable[[list[int], int], Iterable[TokenItem]]


@dataclass(frozen=True)
class Attempt:
    """One call of the generate function."""

    number: int  # 0: the first generation; 1..: retries
    prefix_length: int  # response tokens accepted before this attempt
    tokens: list[int]  # the tokens this attempt produced (up to the flag)
    decision: Decision | None  # the stop decision, None when the attempt ended clean
    rolled_back_to: int | None  # response length kept after the flag (a clean checkpoint)


@dataclass
class CareResult:
    """The outcome: the response as accepted (or as cut back when giving up) and every attempt."""

    tokens: list[int]
    accepted: bool  # True: the last attempt ended without a flag; False: max_retries exhausted
    attempts: list[Attempt] = field(default_factory=list)
    state: StreamState | None = None  # the session (closed unless the caller passed it)

    @property
    def retries(self) -> int:
        return len(self.attempts) - 1


def care_generate(guard: StreamGuard, generate: RegenerateFn, *, prompt: TokenItem | None = None,
                  policy: Policy | None = None, checkpoint_every: int = 40, max_retries: int = 5,
                  max_tokens: int | None = None, state: StreamState | None = None,
                  hooks: Hooks | None = None) -> CareResult:
    """Run the detect-rollback-regenerate loop; see the module docstring."""
    _check_count("checkpoint_every", checkpoint_every, 1)
    _check_count("max_retries", max_retries, 0)
    if max_tokens is not None:
        _check_count("max_tokens", max_tokens, 1)
    if not callable(generate):
        raise TypeError(f"generate must be callable as generate(prefix, attempt), got {generate!r}")
    owns_state = state is None
    session = guard.open_stream() if state is None else state
    try:
        feed_prompt(guard, session, prompt)
        attach(session, policy or ConsecutiveUnsafe(), hooks)
        loop = _CareLoop(guard, session, checkpoint_every, max_tokens)
        return loop.run(generate, max_retries)
    finally:
        if owns_state:
            guard.close_stream(session)


def _check_count(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class _CareLoop:
    def __init__(self, guard: StreamGuard, state: StreamState, checkpoint_every: int,
                 max_tokens: int | None) -> None:
        self.guard, self.state = guard, state
        self.every, self.max_tokens = checkpoint_every, max_tokens
        self.base = state.length  # session position of the first response token
        self.response: list[int] = []
        self.checkpoints = [0]  # clean response lengths

    def run(self, generate: RegenerateFn, max_retries: int) -> CareResult:
        result = CareResult(tokens=[], accepted=False, state=self.state)
        for number in range(max_retries + 1):
            attempt = self._attempt(generate, number)
            result.attempts.append(attempt)
            if attempt.decision is None:
                result.accepted = True
                break
        result.tokens = list(self.response)
        return result

    def _attempt(self, generate: RegenerateFn, number: int) -> Attempt:
        prefix_length, produced = len(self.response), []
        for item in generate(list(self.response), number):
            ids = item_ids(item)
            if self.max_tokens is not None:
                ids = ids[: self.max_tokens - len(self.response)]
            if not ids:
                break
            before = self.state.length
            try:
                self.guard.moderate(self.state, ids, "assistant")
            except Exception:
                if self.state.length != before:  # scored, then a callback raised: keep in step
                    self.response += ids
                raise
            self.response += ids
            produced += ids
            decision = self.state.monitor.stop_decision
            if decision is not None:
                kept = self._roll_back(decision)
                return Attempt(number, prefix_length, produced, decision, kept)
            if len(self.response) >= self.checkpoints[-1] + self.every:
                self.checkpoints.append(len(self.response))
        return Attempt(number, prefix_length, produced, None, None)

    def _roll_back(self, decision: Decision) -> int:
        run_start = decision.start_position - self.base
        self.checkpoints = [c for c in self.checkpoints if c <= run_start]
        kept = self.checkpoints[-1]
        self.guard.rollback(self.state, self.base + kept)
        del self.response[kept:]
        return kept
