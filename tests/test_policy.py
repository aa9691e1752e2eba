"""Decision policies: the pure official rule, its streaming twin, the probability threshold."""

from __future__ import annotations

import random

import pytest

from qguard_stream.policy import (
    CONTROVERSIAL,
    SAFE,
    UNSAFE,
    ConsecutiveUnsafe,
    ProbabilityThreshold,
    TokenVerdict,
    consecutive_unsafe,
)

LEVELS = (SAFE, UNSAFE, CONTROVERSIAL)


def official_consecutive_unsafe(pred_list: list[str]) -> tuple[str, int]:
    """Hand copy of SafetyEvaluator.consecutive_unsafe (QwenLM/Qwen3Guard eval/eval_stream.py)."""
    for i in range(len(pred_list) - 1):
        if pred_list[i] == "Unsafe" and pred_list[i + 1] == "Unsafe":
            return "Unsafe", i + 1
    for i in range(len(pred_list) - 1):
        if pred_list[i] == "Controversial" and pred_list[i + 1] == "Controversial":
            return "Controversial", i + 1
    return "Safe", -1


def random_sequences(count: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    sequences = []
    for _ in range(count):
        weights = [rng.random() + 0.2 for _ in LEVELS]  # vary the mix from list to list
        sequences.append(rng.choices(LEVELS, weights, k=rng.randint(0, 40)))
    return sequences


def tokens(levels: list[str], start: int = 0, probs: list[tuple[float, ...]] | None = None
           ) -> list[TokenVerdict]:
    out = []
    for i, level in enumerate(levels):
        row = probs[i] if probs else tuple(1.0 if lvl == level else 0.0 for lvl in LEVELS)
        out.append(TokenVerdict(start + i, 1000 + i, "assistant", level, max(row), "Violent",
                                1.0, row, LEVELS))
    return out


def stream(policy, levels: list[str], start: int = 0):
    for token in tokens(levels, start):
        policy.observe(token)
    return policy


def test_pure_function_agrees_with_the_official_rule_on_1000_random_sequences():
    for levels in random_sequences(1000):
        assert consecutive_unsafe(levels) == official_consecutive_unsafe(levels), levels


@pytest.mark.parametrize("levels, expected", [
    ([], ("Safe", -1)),
    (["Unsafe"], ("Safe", -1)),
    (["Controversial"], ("Safe", -1)),
    (["Unsafe", "Controversial", "Unsafe", "Controversial"], ("Safe", -1)),
    (["Controversial", "Controversial", "Safe", "Unsafe", "Unsafe"], ("Unsafe", 4)),
    (["Unsafe", "Unsafe"], ("Unsafe", 1)),
    (["Safe", "Controversial", "Controversial", "Unsafe"], ("Controversial", 2)),
    (["Unsafe", "Unsafe", "Unsafe", "Controversial", "Controversial"], ("Unsafe", 1)),
])
def test_pure_function_edge_cases(levels, expected):
    assert consecutive_unsafe(levels) == expected == official_consecutive_unsafe(levels)


def test_window_generalises_the_pair():
    levels = ["Unsafe", "Unsafe", "Safe", "Unsafe", "Unsafe", "Unsafe"]
    assert consecutive_unsafe(levels, window=3) == ("Unsafe", 5)
    assert consecutive_unsafe(levels, window=1) == ("Unsafe", 0)
    assert consecutive_unsafe(["Controversial"] * 3, window=4) == ("Safe", -1)


@pytest.mark.parametrize("window", [0, -1, 1.5, True])
def test_bad_window_is_rejected(window):
    with pytest.raises(ValueError, match="window"):
        consecutive_unsafe(["Unsafe"], window=window)
    with pytest.raises(ValueError, match="window"):
        ConsecutiveUnsafe(window=window)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("window", [1, 2, 3])
def test_streaming_final_verdict_equals_pure_function_on_random_sequences(strict, window):
    for levels in random_sequences(1000, seed=window):
        verdict = stream(ConsecutiveUnsafe(window, strict), levels).verdict()
        assert (verdict.label, verdict.index) == consecutive_unsafe(levels, window), levels


def test_loose_streaming_stops_exactly_where_the_pure_function_flags_unsafe():
    for levels in random_sequences(1000, seed=7):
        stop = stream(ConsecutiveUnsafe(), levels).stop_decision
        label, index = consecutive_unsafe(levels)
        if label == UNSAFE:
            assert (stop.label, stop.index) == (UNSAFE, index)
        else:
            assert stop is None  # loose: Controversial is reported, never a stop


def test_strict_streaming_stop_gives_the_strict_label_at_the_first_run():
    for levels in random_sequences(1000, seed=8):
        stop = stream(ConsecutiveUnsafe(strict=True), levels).stop_decision
        label, _ = consecutive_unsafe(levels)
        strict_label = UNSAFE if label in (UNSAFE, CONTROVERSIAL) else SAFE
        if strict_label == SAFE:
            assert stop is None
            continue
        runs = [consecutive_unsafe([lv if lv == kind else SAFE for lv in levels])[1]
                for kind in (UNSAFE, CONTROVERSIAL)]
        assert stop.index == min(i for i in runs if i >= 0)


def test_controversial_pair_is_reported_without_stopping_in_loose_mode():
    policy = stream(ConsecutiveUnsafe(), ["Controversial", "Controversial", "Safe"])
    [decision] = policy.decisions
    assert (decision.label, decision.index, decision.stop) == (CONTROVERSIAL, 1, False)
    assert policy.stop_decision is None
    assert stream(ConsecutiveUnsafe(strict=True), ["Controversial"] * 2).stop_decision.stop


def test_decision_carries_positions_token_and_category():
    policy = stream(ConsecutiveUnsafe(), ["Safe", "Unsafe", "Unsafe"], start=10)
    d = policy.stop_decision
    assert (d.position, d.start_position, d.index, d.token_id) == (12, 11, 2, 1002)
    assert d.category == "Violent" and d.flagged


def test_truncate_equals_a_fresh_policy_fed_the_kept_part():
    rng = random.Random(3)
    for levels in random_sequences(300, seed=9):
        keep = rng.randint(0, len(levels))
        truncated = stream(ConsecutiveUnsafe(), levels, start=5)
        truncated.truncate(5 + keep)
        fresh = stream(ConsecutiveUnsafe(), levels[:keep], start=5)
        assert truncated.decisions == fresh.decisions
        assert truncated.verdict() == fresh.verdict()
        stream(truncated, ["Unsafe", "Unsafe"], start=5 + keep)  # state machine still consistent
        stream(fresh, ["Unsafe", "Unsafe"], start=5 + keep)
        assert truncated.decisions == fresh.decisions


def test_threshold_flags_after_window_tokens_at_or_above_t():
    probs = [(0.6, 0.4, 0.0), (0.2, 0.5, 0.3), (0.3, 0.5, 0.2), (0.1, 0.9, 0.0)]
    levels = [SAFE, UNSAFE, UNSAFE, UNSAFE]
    policy = ProbabilityThreshold(0.5, window=2)
    for token in tokens(levels, probs=probs):
        policy.observe(token)
    assert [(d.label, d.index, d.start_position) for d in policy.decisions] == [(UNSAFE, 2, 1)]


def test_threshold_strict_adds_controversial():
    probs = [(0.3, 0.4, 0.3), (0.35, 0.35, 0.3)]
    loose, strict = ProbabilityThreshold(0.6), ProbabilityThreshold(0.6, strict=True)
    for token in tokens([SAFE, SAFE], probs=probs):
        loose.observe(token)
        strict.observe(token)
    assert loose.stop_decision is None
    assert strict.stop_decision.index == 1


def test_threshold_run_resets_below_t():
    probs = [(0.0, 0.9, 0.1), (0.9, 0.1, 0.0), (0.0, 0.9, 0.1)]
    policy = ProbabilityThreshold(0.5, window=2)
    for token in tokens([UNSAFE, SAFE, UNSAFE], probs=probs):
        policy.observe(token)
    assert policy.decisions == [] and policy.verdict().label == SAFE


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.1])
def test_bad_threshold_is_rejected(threshold):
    with pytest.raises(ValueError, match="threshold"):
        ProbabilityThreshold(threshold)


def test_fresh_copies_settings_not_state():
    policy = stream(ConsecutiveUnsafe(window=3, strict=True), ["Unsafe"] * 3)
    fresh = policy.fresh()
    assert (fresh.window, fresh.strict, fresh.decisions, fresh.history) == (3, True, [], [])
