"""care_generate: flagged attempts are rolled back to the last clean checkpoint (no re-prefill) and
regenerated; a clean retry is accepted; max_retries is honoured."""

from __future__ import annotations

import pytest
import torch

from qguard_stream import Hooks, StreamGuard
from qguard_stream.checkpoints import make_trigger_checkpoint
from qguard_stream.integrations.care import care_generate

TRIGGERS = (500, 501)
PROMPT = [151644, 872, 198, 40, 41, 151645, 198, 151644, 77091, 198]
CLEAN = list(range(10, 30))


@pytest.fixture(scope="module")
def guard(tmp_path_factory) -> StreamGuard:
    path = make_trigger_checkpoint(tmp_path_factory.mktemp("trigger"), TRIGGERS)
    return StreamGuard.from_pretrained(path, device="cpu")


class Scripted:
    """A generate function replaying one script per attempt; records its calls."""

    def __init__(self, scripts: list[list[int]]) -> None:
        self.scripts, self.calls = scripts, []

    def __call__(self, prefix: list[int], attempt: int):
        self.calls.append((list(prefix), attempt))
        return iter(self.scripts[min(attempt, len(self.scripts) - 1)])


def fresh_probs(guard: StreamGuard, ids: list[int]) -> torch.Tensor:
    state = guard.open_stream()
    guard.moderate(state, PROMPT[:6], "user")
    probs = guard.moderate(state, [*PROMPT[6:], *ids], "assistant").risk_probs[4:]
    guard.close_stream(state)
    return probs


def test_flagged_attempt_is_rolled_back_and_a_clean_retry_accepted(guard):
    first = [*CLEAN[:10], 500, 501, *CLEAN[10:14]]  # pair at response indices 10, 11
    retry = CLEAN[10:16]
    generate = Scripted([first, retry])
    scored: list[int] = []
    hooks = Hooks()
    hooks.on_token(lambda t: scored.append(t.position))
    state = guard.open_stream()
    result = care_generate(guard, generate, prompt=PROMPT, checkpoint_every=4, state=state,
                           hooks=hooks)
    assert result.accepted and result.retries == 1
    flagged, clean = result.attempts
    assert flagged.tokens == first[:12] and flagged.decision.token_id == 501
    assert flagged.rolled_back_to == 8  # last checkpoint at or before the run start (10)
    assert generate.calls == [([], 0), (first[:8], 1)]
    assert clean.prefix_length == 8 and clean.decision is None
    assert result.tokens == [*first[:8], *retry]
    assert state.token_ids == [*PROMPT, *result.tokens]
    # no re-prefill: each response token was scored once per attempt, the prompt never again
    base = len(PROMPT)
    assert scored == [base + i for i in range(12)] + [base + 8 + i for i in range(len(retry))]
    # the rolled-back session scores like a fresh one fed the final tokens
    expected = fresh_probs(guard, result.tokens)[-len(retry):]
    assert torch.allclose(state.last_verdicts.risk_probs, expected, atol=1e-5)
    guard.close_stream(state)


def test_the_checkpoint_is_clean_even_when_the_run_straddles_it(guard):
    first = [*CLEAN[:7], 500, 501, *CLEAN[7:9]]  # run 7..8 straddles the checkpoint at 8
    result = care_generate(guard, Scripted([first, CLEAN[:3]]), checkpoint_every=4)
    assert result.attempts[0].rolled_back_to == 4
    assert result.tokens == [*first[:4], *CLEAN[:3]]


def test_max_retries_is_honoured(guard):
    always_flagged = [*CLEAN[:5], 500, 501, *CLEAN[5:8]]
    generate = Scripted([always_flagged])
    result = care_generate(guard, generate, prompt=PROMPT, checkpoint_every=2, max_retries=3)
    assert not result.accepted
    assert len(generate.calls) == len(result.attempts) == 4
    assert all(a.decision is not None for a in result.attempts)
    # each retry resumes from the clean prefix, which grows as the script is replayed after it
    assert [a.rolled_back_to for a in result.attempts] == [4, 8, 12, 16]
    assert result.tokens == (always_flagged[:4] * 4)
    assert result.state.closed


def test_zero_retries_gives_up_after_the_first_flag(guard):
    generate = Scripted([[500, 501, 10]])
    result = care_generate(guard, generate, max_retries=0)
    assert not result.accepted and len(generate.calls) == 1 and result.tokens == []


def test_max_tokens_caps_the_response(guard):
    result = care_generate(guard, Scripted([CLEAN]), max_tokens=5)
    assert result.accepted and result.tokens == CLEAN[:5]


@pytest.mark.parametrize("options, match", [({"checkpoint_every": 0}, "checkpoint_every"),
                                            ({"max_retries": -1}, "max_retries"),
                                            ({"max_tokens": 0}, "max_tokens")])
def test_bad_options_are_rejected(guard, options, match):
    with pytest.raises(ValueError, match=match):
        care_generate(guard, Scripted([CLEAN]), **options)


def test_generate_must_be_callable(guard):
    with pytest.raises(TypeError, match="generate"):
        care_generate(guard, [1, 2, 3])
