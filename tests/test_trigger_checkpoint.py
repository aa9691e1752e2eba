"""make_trigger_checkpoint: a real-format checkpoint whose guard flags chosen token ids."""

from __future__ import annotations

import json
import random

import pytest

from qguard_stream import StreamGuard
from qguard_stream.checkpoints import make_trigger_checkpoint

UNSAFE_IDS, CONTROVERSIAL_IDS = (151_000, 77, 500), (600, 601)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_trigger_checkpoint(tmp_path_factory.mktemp("trigger"), UNSAFE_IDS,
                                   CONTROVERSIAL_IDS, category=2)


@pytest.fixture(scope="module")
def guard(checkpoint):
    return StreamGuard.from_pretrained(checkpoint, device="cpu")


def expected_level(token_id: int) -> str:
    if token_id in UNSAFE_IDS:
        return "Unsafe"
    return "Controversial" if token_id in CONTROVERSIAL_IDS else "Safe"


@pytest.mark.parametrize("role", ["assistant", "user"])
def test_levels_follow_the_trigger_ids_in_any_context(guard, role):
    rng = random.Random(0)
    pool = [*UNSAFE_IDS, *CONTROVERSIAL_IDS, *range(1000)]
    ids = [rng.choice(pool) for _ in range(200)]
    state = guard.open_stream()
    verdicts = guard.moderate(state, ids[:150], role)
    levels = verdicts.risk_level + guard.moderate(state, ids[150:], role).risk_level
    guard.close_stream(state)
    assert levels == [expected_level(t) for t in ids]
    flagged = [c for c, t in zip(verdicts.category, ids) if expected_level(t) != "Safe"]
    assert set(flagged) == {"Suicide & Self-Harm"}
    assert min(verdicts.risk_prob) > 0.99


def test_written_in_the_real_format(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForGuardModel"]
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "vocab.json").exists()


def test_bad_trigger_ids_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="both"):
        make_trigger_checkpoint(tmp_path, [5], [5])
    with pytest.raises(ValueError, match="200000"):
        make_trigger_checkpoint(tmp_path, [200000])
    with pytest.raises(TypeError, match="integers"):
        make_trigger_checkpoint(tmp_path, ["5"])
    with pytest.raises(ValueError, match="category"):
        make_trigger_checkpoint(tmp_path, [5], category=8)
