"""Callbacks: order and content of events, error rule, rollback, zero cost when unused."""

from __future__ import annotations

import logging

import pytest
import torch

from qguard_stream import (
    ConsecutiveUnsafe,
    FlagEvent,
    Hooks,
    StreamGuard,
    TokenVerdict,
    TransitionEvent,
    attach,
)
from qguard_stream.checkpoints import make_trigger_checkpoint

UNSAFE_IDS, CONTROVERSIAL_IDS = (500, 501), (600,)
# levels by construction:   S    U    U    S  C    C    S
SEQUENCE = [10, 500, 501, 11, 600, 600, 12]


@pytest.fixture(scope="module")
def guard(tmp_path_factory) -> StreamGuard:
    path = make_trigger_checkpoint(tmp_path_factory.mktemp("trigger"), UNSAFE_IDS,
                                   CONTROVERSIAL_IDS, category=4)
    return StreamGuard.from_pretrained(path, device="cpu")


def recording_hooks(log: list, tag: str = "", errors: str = "raise") -> Hooks:
    hooks = Hooks(errors=errors)
    hooks.on_token(lambda t: log.append((tag + "token", t.position)))
    hooks.on_transition(lambda e: log.append((tag + "transition", e.position, e.previous_level,
                                              e.level)))
    hooks.on_flag(lambda e: log.append((tag + "flag", e.decision.position, e.decision.label,
                                        e.decision.stop)))
    return hooks


EXPECTED = [
    ("token", 0),
    ("token", 1), ("transition", 1, "Safe", "Unsafe"),
    ("token", 2), ("flag", 2, "Unsafe", True),
    ("token", 3), ("transition", 3, "Unsafe", "Safe"),
    ("token", 4), ("transition", 4, "Safe", "Controversial"),
    ("token", 5), ("flag", 5, "Controversial", False),
    ("token", 6), ("transition", 6, "Controversial", "Safe"),
]


@pytest.mark.parametrize("chunk", [1, 3, len(SEQUENCE)])
def test_callback_order_for_a_known_sequence(guard, chunk):
    log: list = []
    state = guard.open_stream()
    attach(state, ConsecutiveUnsafe(), recording_hooks(log))
    for i in range(0, len(SEQUENCE), chunk):
        guard.moderate(state, SEQUENCE[i:i + chunk], "assistant")
    guard.close_stream(state)
    assert log == EXPECTED


def test_event_content(guard):
    events: list = []
    hooks = Hooks()
    hooks.on_transition(events.append)
    hooks.on_flag(events.append)
    state = guard.open_stream()
    attach(state, ConsecutiveUnsafe(), hooks)
    verdicts = guard.moderate(state, SEQUENCE[:3], "assistant")
    guard.close_stream(state)
    transition, flag = events
    assert isinstance(transition, TransitionEvent) and isinstance(flag, FlagEvent)
    assert (transition.session_id, transition.role, transition.token_id) == (
        state.id, "assistant", 500)
    assert transition.category == "PII" == verdicts.category[1]
    assert transition.risk_prob == pytest.approx(verdicts.risk_prob[1])
    d = flag.decision
    assert (d.label, d.index, d.position, d.start_position, d.token_id, d.category) == (
        "Unsafe", 2, 2, 1, 501, "PII")


def test_on_token_receives_the_verdicts_of_moderate(guard):
    seen: list[TokenVerdict] = []
    hooks = Hooks()
    hooks.on_token(seen.append)
    state = guard.open_stream()
    attach(state, None, hooks)
    verdicts = guard.moderate(state, SEQUENCE, "assistant")
    guard.close_stream(state)
    assert [t.position for t in seen] == list(verdicts.positions)
    assert [t.risk_level for t in seen] == verdicts.risk_level
    assert torch.allclose(torch.tensor([t.risk_probs for t in seen]), verdicts.risk_probs)


def test_session_hooks_fire_before_guard_hooks(guard):
    log: list = []
    guard.hooks = recording_hooks(log, "guard-")
    try:
        state = guard.open_stream()
        attach(state, ConsecutiveUnsafe(), recording_hooks(log, "session-"))
        guard.moderate(state, SEQUENCE[:2], "assistant")
        guard.close_stream(state)
    finally:
        guard.hooks = Hooks()
    assert log == [("session-token", 0), ("guard-token", 0),
                   ("session-token", 1), ("guard-token", 1),
                   ("session-transition", 1, "Safe", "Unsafe"),
                   ("guard-transition", 1, "Safe", "Unsafe")]


def test_guard_policy_factory_gives_each_session_its_own_policy(guard):
    guard.policy_factory = ConsecutiveUnsafe
    try:
        first, second = guard.open_stream(), guard.open_stream()
        guard.moderate(first, SEQUENCE[:3], "assistant")
        guard.moderate(second, SEQUENCE[:2], "assistant")
        assert first.monitor.stop_decision.position == 2
        assert second.monitor.stop_decision is None
        assert first.monitor.policy is not second.monitor.policy
    finally:
        guard.policy_factory = None
        guard.close_stream(first)
        guard.close_stream(second)


def test_nothing_registered_means_no_dispatch(guard):
    state = guard.open_stream()
    guard.moderate(state, SEQUENCE, "assistant")
    assert state.monitor is None
    guard.close_stream(state)


def reference_probs(guard: StreamGuard, ids: list[int]) -> torch.Tensor:
    state = guard.open_stream()
    probs = guard.moderate(state, ids, "assistant").risk_probs
    guard.close_stream(state)
    return probs


def test_raising_callback_propagates_after_the_session_is_fully_updated(guard):
    class Boom(Exception):
        pass

    calls: list[int] = []
    hooks = Hooks()

    @hooks.on_token
    def explode(token: TokenVerdict) -> None:
        calls.append(token.position)
        if token.position == 1:
            raise Boom

    state = guard.open_stream()
    monitor = attach(state, ConsecutiveUnsafe(), hooks)
    with pytest.raises(Boom):
        guard.moderate(state, SEQUENCE[:3], "assistant")
    assert calls == [0, 1]  # dispatch stopped at the raising callback
    assert state.token_ids == SEQUENCE[:3] and state.last_verdicts.positions == range(3)
    assert [lv for _, _, lv in monitor.levels] == ["Safe", "Unsafe", "Unsafe"]
    assert monitor.stop_decision.position == 2  # the policy saw every token
    hooks.token_callbacks.clear()
    guard.moderate(state, SEQUENCE[3:], "assistant")  # the session goes on consistently
    assert state.token_ids == SEQUENCE
    expected = reference_probs(guard, SEQUENCE)[3:]
    assert torch.allclose(state.last_verdicts.risk_probs, expected, atol=1e-5)
    guard.close_stream(state)


def test_log_mode_logs_and_continues(guard, caplog):
    log: list = []
    hooks = recording_hooks(log, errors="log")
    hooks.token_callbacks.insert(0, lambda t: 1 / 0)
    state = guard.open_stream()
    attach(state, ConsecutiveUnsafe(), hooks)
    with caplog.at_level(logging.ERROR, logger="qguard_stream.hooks"):
        guard.moderate(state, SEQUENCE, "assistant")
    guard.close_stream(state)
    assert log == EXPECTED
    assert len([r for r in caplog.records if "ZeroDivisionError" in (r.exc_text or "")]) == 7


def test_rollback_restores_levels_and_decisions(guard):
    log: list = []
    state = guard.open_stream()
    monitor = attach(state, ConsecutiveUnsafe(), recording_hooks(log))
    guard.moderate(state, SEQUENCE[:3], "assistant")
    assert monitor.stop_decision is not None
    guard.rollback(state, 2)
    assert monitor.stop_decision is None and monitor.previous_level("assistant") == "Unsafe"
    log.clear()
    guard.moderate(state, [12], "assistant")
    assert log == [("token", 2), ("transition", 2, "Unsafe", "Safe")]
    guard.close_stream(state)


def test_transitions_compare_tokens_of_the_same_role(guard):
    log: list = []
    state = guard.open_stream()
    attach(state, None, recording_hooks(log))
    guard.moderate(state, [500], "user")
    guard.moderate(state, [10, 501], "assistant")
    guard.close_stream(state)
    transitions = [e for e in log if e[0] == "transition"]
    assert transitions == [("transition", 0, "Safe", "Unsafe"), ("transition", 2, "Safe", "Unsafe")]


def test_bad_registrations_are_rejected():
    with pytest.raises(TypeError, match="callable"):
        Hooks().on_flag("not a function")
    with pytest.raises(ValueError, match="errors"):
        Hooks(errors="ignore")
