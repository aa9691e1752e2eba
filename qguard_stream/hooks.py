"""Events and callback dispatch: on_token, on_transition, on_flag, run after a session's forward.

`Hooks` holds callbacks; register them on a guard (`guard.hooks`, every session) or on one session
(`qguard_stream.attach(state, policy, hooks)`). A session's `Monitor` owns what dispatch needs to
remember: the policy instance, the last level per role (for transitions) and the decisions made.
The Monitor is the one tracker of transitions and decisions: the library's callbacks, `watch`, the
server's frames and the CLI all read theirs from it.

Order for each call to `StreamGuard.moderate`: the session (cache, tokens, last_verdicts) is updated
first; then the monitor's bookkeeping (levels, policy, decisions) for *all* new tokens; only then
are callbacks fired, token by token in position order: on_token, then on_transition if the level
changed, then on_flag if the policy decided at that token; session hooks before guard hooks.

A callback that raises: with `errors="raise"` (default) dispatch stops and the exception propagates
to the caller of `moderate`; the session and monitor are already fully updated and consistent (the
verdicts are in `state.last_verdicts`), only the remaining callbacks of that call are not delivered.
With `errors="log"` the exception is logged and dispatch continues.

The transition rule: a transition is a change of the winning risk level between consecutive
scored tokens of one role in one session, and each role's first token is compared with Safe (so
a first non-Safe token fires Safe -> level; tokens of the other role in between do not matter).
This module never runs inside the forward and costs nothing when no hooks or policy are
registered (StreamGuard.moderate skips it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from qguard_stream.policy import SAFE, Decision, Policy, TokenVerdict
from qguard_stream.verdicts import Verdicts

logger = logging.getLogger("qguard_stream.hooks")
ERROR_MODES = ("raise", "log")


@dataclass(frozen=True)
class TransitionEvent:
    """The per-token risk level changed."""

    session_id: int
    role: str
    position: int
    token_id: int
    previous_level: str
    level: str
    category: str
    risk_prob: float


@dataclass(frozen=True)
class FlagEvent:
    """A policy decided (decision.stop says whether it asks the stream to stop)."""

    session_id: int
    decision: Decision


TokenCallback = Callable[[TokenVerdict], object]
TransitionCallback = Callable[[TransitionEvent], object]
FlagCallback = Callable[[FlagEvent], object]


@dataclass(eq=False)
class Hooks:
    """Callback lists. `hooks.on_flag(fn)` registers and returns fn (usable as a decorator)."""

    token_callbacks: list[TokenCallback] = field(default_factory=list)
    transition_callbacks: list[TransitionCallback] = field(default_factory=list)
    flag_callbacks: list[FlagCallback] = field(default_factory=list)
    errors: str = "raise"

    def __post_init__(self) -> None:
        if self.errors not in ERROR_MODES:
            raise ValueError(f"errors must be one of {ERROR_MODES}, got {self.errors!r}")

    def __bool__(self) -> bool:
        return bool(self.token_callbacks or self.transition_callbacks or self.flag_callbacks)

    def on_token(self, callback: TokenCallback) -> TokenCallback:
        self.token_callbacks.append(_callable(callback))
        return callback

    def on_transition(self, callback: TransitionCallback) -> TransitionCallback:
        self.transition_callbacks.append(_callable(callback))
        return callback

    def on_flag(self, callback: FlagCallback) -> FlagCallback:
        self.flag_callbacks.append(_callable(callback))
        return callback


def _callable(callback: object) -> object:
    if not callable(callback):
        raise TypeError(f"a callback must be callable, got {callback!r}")
    return callback


@dataclass(eq=False)
class Monitor:
    """Per-session dispatch state. The policy sees assistant tokens at positions >= policy_start
    (set it past the prompt and the assistant header so only the response is judged)."""

    policy: Policy | None = None
    hooks: Hooks = field(default_factory=Hooks)
    policy_start: int = 0
    levels: list[tuple[int, str, str]] = field(default_factory=list)  # (position, role, level)
    last_tokens: list[TokenVerdict] = field(default_factory=list)  # the last call's tokens

    @property
    def decisions(self) -> list[Decision]:
        return self.policy.decisions if self.policy is not None else []

    @property
    def stop_decision(self) -> Decision | None:
        return self.policy.stop_decision if self.policy is not None else None

    def previous_level(self, role: str) -> str:
        return next((lvl for _, r, lvl in reversed(self.levels) if r == role), SAFE)

    def truncate(self, length: int) -> None:
        """Follow a session rollback to `length` tokens."""
        while self.levels and self.levels[-1][0] >= length:
            self.levels.pop()
        self.last_tokens = []
        if self.policy is not None:
            self.policy.truncate(length)

    def record(self, session_id: int, tokens: list[TokenVerdict]) -> list[tuple]:
        """Update levels and policy for all tokens; return the events to fire, in order."""
        events: list[tuple] = []
        self.last_tokens = tokens
        for token in tokens:
            previous = self.previous_level(token.role)
            self.levels.append((token.position, token.role, token.risk_level))
            events.append(("token", token))
            if token.risk_level != previous:
                events.append(("transition", TransitionEvent(
                    session_id, token.role, token.position, token.token_id, previous,
                    token.risk_level, token.category, token.risk_prob)))
            if self._judged(token) and (decision := self.policy.observe(token)) is not None:
                events.append(("flag", FlagEvent(session_id, decision)))
        return events

    def _judged(self, token: TokenVerdict) -> bool:
        return (self.policy is not None and token.role == "assistant"
                and token.position >= self.policy_start)


def token_verdicts(verdicts: Verdicts) -> list[TokenVerdict]:
    """Split a call's Verdicts into per-token records (one device-to-host copy)."""
    risk_rows = verdicts.risk_probs.tolist()
    return [
        TokenVerdict(position, token_id, verdicts.role, level, risk_prob, category, cat_prob,
                     tuple(row), verdicts.risk_labels)
        for position, token_id, level, risk_prob, category, cat_prob, row in zip(
            verdicts.positions, verdicts.token_ids, verdicts.risk_level, verdicts.risk_prob,
            verdicts.category, verdicts.category_prob, risk_rows)
    ]


class MonitoredSession(Protocol):
    """What `attach` needs of a session (a StreamState): its length and its monitor slot."""

    monitor: Monitor | None

    @property
    def length(self) -> int: ...


def attach(state: MonitoredSession, policy: Policy | None = None, hooks: Hooks | None = None,
           policy_start: int | None = None) -> Monitor:
    """Give a session its own policy and/or callbacks (replacing any monitor it had). The policy
    judges assistant tokens from `policy_start` (default: the session's current length) on."""
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy must be a qguard_stream.policy.Policy, got {policy!r}")
    start = state.length if policy_start is None else policy_start
    state.monitor = Monitor(policy=policy, hooks=hooks or Hooks(), policy_start=start)
    return state.monitor


@torch.inference_mode(False)
def dispatch(monitor: Monitor, session_id: int, verdicts: Verdicts, guard_hooks: Hooks) -> None:
    """Record a scored call in the session's monitor, then fire its events: the session's hooks,
    then `guard_hooks` (callbacks run outside inference mode, so tensors they make are ordinary
    tensors)."""
    events = monitor.record(session_id, token_verdicts(verdicts))
    registered = [hooks for hooks in (monitor.hooks, guard_hooks) if hooks]
    for kind, event in events:
        for hooks in registered:
            _fire(hooks, kind, event)


def _fire(hooks: Hooks, kind: str, event: object) -> None:
    callbacks = {"token": hooks.token_callbacks, "transition": hooks.transition_callbacks,
                 "flag": hooks.flag_callbacks}[kind]
    for callback in callbacks:
        try:
            callback(event)
        except Exception:
            if hooks.errors == "raise":
                raise
            logger.exception("%s callback %r raised; continuing", kind, callback)
