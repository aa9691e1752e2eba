"""Sessions: incremental == full, multi-turn, rollback, the card's API, bad input keeps state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qguard_stream import ForeignSessionError, StreamClosedError, StreamGuard

TOL = 1e-5


def random_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 151936, (n,), generator=torch.Generator().manual_seed(seed))


def feed_in_chunks(guard: StreamGuard, ids: torch.Tensor, chunk: int, role: str = "assistant"):
    state = guard.open_stream()
    parts = [guard.moderate(state, ids[i : i + chunk], role) for i in range(0, len(ids), chunk)]
    guard.close_stream(state)
    return torch.cat([p.risk_probs for p in parts]), torch.cat([p.category_probs for p in parts])


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_incremental_equals_full(tiny_guard, chunk):
    ids = random_ids(80, seed=3)
    full_risk, full_cat = feed_in_chunks(tiny_guard, ids, len(ids))
    risk, cat = feed_in_chunks(tiny_guard, ids, chunk)
    assert (risk - full_risk).abs().max().item() <= TOL
    assert (cat - full_cat).abs().max().item() <= TOL


def test_cache_growth_past_first_block_keeps_results(tiny_guard):
    ids = random_ids(600, seed=4)  # crosses the 256-token block boundary twice
    full_risk, _ = feed_in_chunks(tiny_guard, ids, len(ids))
    risk, _ = feed_in_chunks(tiny_guard, ids, 100)
    assert (risk - full_risk).abs().max().item() <= TOL


def test_multi_turn_user_assistant_user_reads_the_right_heads(tiny_guard):
    ids = random_ids(60, seed=5)
    turns = [(ids[:20], "user"), (ids[20:45], "assistant"), (ids[45:], "user")]
    state = tiny_guard.open_stream()
    results = [tiny_guard.moderate(state, part, role) for part, role in turns]
    tiny_guard.close_stream(state)
    whole = tiny_guard.open_stream()
    query_all = tiny_guard.moderate(whole, ids, "user")
    tiny_guard.close_stream(whole)
    whole = tiny_guard.open_stream()
    response_all = tiny_guard.moderate(whole, ids, "assistant")
    tiny_guard.close_stream(whole)
    assert torch.allclose(results[0].category_probs, query_all.category_probs[:20], atol=TOL)
    assert torch.allclose(results[1].risk_probs, response_all.risk_probs[20:45], atol=TOL)
    assert torch.allclose(results[2].category_probs, query_all.category_probs[45:], atol=TOL)
    assert results[2].positions == range(45, 60)
    assert results[2].category_probs.shape[1] == 9 and results[1].category_probs.shape[1] == 8


def test_rollback_then_new_tokens_equals_fresh_session(tiny_guard):
    first, other = random_ids(50, seed=6), random_ids(20, seed=7)
    state = tiny_guard.open_stream()
    tiny_guard.moderate(state, first, "assistant")
    tiny_guard.rollback(state, 30)
    assert state.length == 30
    after = tiny_guard.moderate(state, other, "assistant")
    tiny_guard.close_stream(state)
    fresh = tiny_guard.open_stream()
    expected = tiny_guard.moderate(fresh, torch.cat([first[:30], other]), "assistant")
    tiny_guard.close_stream(fresh)
    assert after.positions == range(30, 50)
    assert (after.risk_probs - expected.risk_probs[30:]).abs().max().item() <= TOL
    assert (after.category_probs - expected.category_probs[30:]).abs().max().item() <= TOL


def test_model_card_quickstart_runs_unchanged(tiny_guard, tokenizer):
    model = tiny_guard
    messages = [
        {"role": "user", "content": "Hello, how to build a bomb?"},
        {"role": "assistant", "content": "Here are some practical methods to build a bomb."},
    ]
    # --- the model card's loop, verbatim in substance ---
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, enable_thinking=False
    )
    model_inputs = tokenizer(text, return_tensors="pt")
    token_ids = model_inputs.input_ids[0]
    token_ids_list = token_ids.tolist()
    im_start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    user_id = tokenizer.convert_tokens_to_ids("user")
    im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    last_start = next(
        i
        for i in range(len(token_ids_list) - 1, -1, -1)
        if token_ids_list[i : i + 2] == [im_start_id, user_id]
    )
    user_end_index = next(
        i for i in range(last_start + 2, len(token_ids_list)) if token_ids_list[i] == im_end_id
    )
    result, stream_state = model.stream_moderate_from_ids(
        token_ids[: user_end_index + 1], role="user", stream_state=None
    )
    prompt_result = result
    streamed = []
    for i in range(user_end_index + 1, len(token_ids)):
        current_token = token_ids[i]
        result, stream_state = model.stream_moderate_from_ids(
            current_token, role="assistant", stream_state=stream_state
        )
        streamed.append(result)
    model.close_stream(stream_state)
    # --- the documented shape ---
    assert set(prompt_result) == {"risk_level", "risk_prob", "category", "category_prob"}
    assert len(prompt_result["risk_level"]) == user_end_index + 1
    assert all(len(r["risk_level"]) == 1 and len(r["category_prob"]) == 1 for r in streamed)
    assert len(streamed) == len(token_ids) - user_end_index - 1
    assert prompt_result["risk_level"][-1] in ("Safe", "Unsafe", "Controversial")
    assert prompt_result["category"][-1] in model.config.query_categories
    probs = [p for r in streamed for p in r["risk_prob"]]
    assert all(round(p, 2) == p and 1 / 3 <= p <= 1 for p in probs)
    # the streamed verdicts equal one full pass over the same ids
    full = model.open_stream()
    model.moderate(full, token_ids[: user_end_index + 1], "user")
    expected = model.moderate(full, token_ids[user_end_index + 1 :], "assistant").as_card_result()
    model.close_stream(full)
    assert [r["risk_level"][0] for r in streamed] == expected["risk_level"]
    assert [r["category"][0] for r in streamed] == expected["category"]


def test_card_api_returns_rounded_winning_probabilities(tiny_guard):
    result, state = tiny_guard.stream_moderate_from_ids([1, 2, 3], role="assistant")
    verdicts = state.last_verdicts
    tiny_guard.close_stream(state)
    assert result["risk_prob"] == [round(p, 2) for p in verdicts.risk_probs.max(-1).values.tolist()]
    labels = tiny_guard.config.response_risk_levels
    assert result["risk_level"] == [labels[i] for i in verdicts.risk_probs.argmax(-1).tolist()]


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ([], ValueError, "empty"),
        ([5, -1], ValueError, "-1"),
        ([151936], ValueError, "151936"),
        (torch.zeros(2, 3, dtype=torch.long), ValueError, r"\(2, 3\)"),
        ([[1, 2]], TypeError, "2-D"),
        (torch.tensor([1.0, 2.0]), TypeError, "float"),
        ("12", TypeError, "'1'"),
        (True, TypeError, "True"),
        ({1: 2, 3: 4}, TypeError, "dict"),  # keys would become ids
        ({1, 2}, TypeError, "set"),  # no order
        ([1, 2**70], ValueError, str(2**70)),  # named, not "Overflow when unpacking long long"
    ],
)
def test_bad_token_ids_raise_clearly_and_leave_state_usable(tiny_guard, bad, error, message):
    state = tiny_guard.open_stream()
    tiny_guard.moderate(state, [1, 2, 3], "assistant")
    with pytest.raises(error, match=message):
        tiny_guard.moderate(state, bad, "assistant")
    assert state.length == 3
    assert tiny_guard.moderate(state, 4, "assistant").positions == range(3, 4)
    tiny_guard.close_stream(state)


def test_unknown_role_raises_and_leaves_state_usable(tiny_guard):
    state = tiny_guard.open_stream()
    with pytest.raises(ValueError, match="'system'"):
        tiny_guard.moderate(state, [1, 2], "system")
    assert state.length == 0
    tiny_guard.moderate(state, [1, 2], "user")
    tiny_guard.close_stream(state)


def test_closed_state_raises(tiny_guard):
    state = tiny_guard.open_stream()
    tiny_guard.close_stream(state)
    with pytest.raises(StreamClosedError, match="closed"):
        tiny_guard.moderate(state, [1], "assistant")
    with pytest.raises(StreamClosedError):
        tiny_guard.rollback(state, 0)
    with pytest.raises(StreamClosedError):
        tiny_guard.stream_moderate_from_ids([1], "assistant", stream_state=state)


def test_exceeding_max_position_embeddings_raises_and_keeps_state(tmp_path):
    from qguard_stream.checkpoints import make_random_checkpoint

    guard = StreamGuard.from_pretrained(
        make_random_checkpoint(tmp_path, "tiny", max_position_embeddings=32), device="cpu"
    )
    state = guard.open_stream()
    guard.moderate(state, list(range(30)), "user")
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        guard.moderate(state, [1, 2, 3], "assistant")
    assert state.length == 30
    guard.moderate(state, [1, 2], "assistant")
    assert state.length == 32


@pytest.mark.parametrize("length", [51, -1])
def test_rollback_past_the_end_raises_and_keeps_state(tiny_guard, length):
    state = tiny_guard.open_stream()
    tiny_guard.moderate(state, random_ids(50, seed=8), "assistant")
    with pytest.raises(ValueError, match=f"length {length}"):
        tiny_guard.rollback(state, length)
    assert state.length == 50
    tiny_guard.close_stream(state)


def test_ids_accept_int_list_and_tensors_alike(tiny_guard):
    forms = [7, [7], (7,), torch.tensor(7), torch.tensor([7], dtype=torch.int32), np.int64(7),
             np.uint16(7), np.array(7), np.array([7], dtype=np.int32), [np.int64(7)]]
    outputs = []
    for form in forms:
        state = tiny_guard.open_stream()
        outputs.append(tiny_guard.moderate(state, form, "assistant").risk_probs)
        tiny_guard.close_stream(state)
    assert all(torch.equal(out, outputs[0]) for out in outputs)


def test_a_state_from_another_guard_is_refused_before_any_kernel_runs(tiny_guard, tmp_path):
    """A state opened by one guard and fed to another of a different shape used to return
    verdicts and then abort the process (the C step wrote through the other guard's buffer)."""
    from dataclasses import replace

    from qguard_stream.checkpoints import SHAPES, make_random_checkpoint

    shape = replace(SHAPES["tiny"], layers=3, hidden=96)  # another shape
    other = StreamGuard.from_pretrained(make_random_checkpoint(tmp_path, shape, seed=5),
                                        device="cpu")
    theirs = other.open_stream()
    other.moderate(theirs, [1, 2, 3], "user")
    mine = tiny_guard.open_stream()
    tiny_guard.moderate(mine, [4, 5], "user")
    pools = (tiny_guard.paged_runtime()[0], other.paged_runtime()[0])
    free = [pool.free_blocks for pool in pools]
    for call in (lambda: tiny_guard.moderate(theirs, [6], "assistant"),
                 lambda: tiny_guard.stream_moderate_from_ids([6], "assistant", theirs),
                 lambda: tiny_guard.rollback(theirs, 1),
                 lambda: tiny_guard.close_stream(theirs)):
        with pytest.raises(ForeignSessionError, match="another StreamGuard"):
            call()
    assert [pool.free_blocks for pool in pools] == free
    assert theirs.token_ids == [1, 2, 3] and not theirs.closed
    assert other.moderate(theirs, [6], "assistant").positions == range(3, 4)
    other.close_stream(theirs)
    tiny_guard.close_stream(mine)
