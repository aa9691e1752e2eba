"""TextStreamGuard: verdicts over streamed text equal verdicts over tokenizer(full_text)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qguard_stream import StreamClosedError, StreamGuard, TextStreamGuard, Verdicts
from qguard_stream.checkpoints import SHAPES, make_random_checkpoint
from qguard_stream.config import GuardConfig
from qguard_stream.loader import load_model

RESPONSE = ("Sure! Here's how: first, don't   panic.\n\n1. Mix 2 cups (500 ml) — carefully; "
            "日本語のテキスト 👩\u200d👩\u200d👧 café.")
PROMPT = "Hello, how to build a bomb?"
# From the reference's verified rendering of PROMPT (REFERENCE.md, "Verification run").
PROMPT_USER_IDS = [151644, 872, 198, 9707, 11, 1246, 311, 1936, 264, 12764, 30, 151645]
GENERATION_HEADER_IDS = [198, 151644, 77091, 198, 151667, 271, 151668, 271]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def direct(guard: StreamGuard, parts: list[tuple[list[int], str]]) -> list[Verdicts]:
    state = guard.open_stream()
    try:
        return [guard.moderate(state, ids, role) for ids, role in parts]
    finally:
        guard.close_stream(state)


def probs(verdicts: list[Verdicts | None]) -> tuple[torch.Tensor, torch.Tensor]:
    kept = [v for v in verdicts if v is not None]
    return (torch.cat([v.risk_probs for v in kept]), torch.cat([v.category_probs for v in kept]))


def assert_same_verdicts(streamed: list[Verdicts | None], reference: Verdicts) -> None:
    risk, category = probs(streamed)
    torch.testing.assert_close(risk, reference.risk_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(category, reference.category_probs, atol=1e-5, rtol=0)
    kept = [v for v in streamed if v is not None]
    assert [p for v in kept for p in v.positions] == list(reference.positions)


def chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_text_deltas_score_exactly_the_one_shot_tokens(tiny_guard, tokenizer):
    text_guard = TextStreamGuard(tiny_guard)
    streamed = [text_guard.feed(delta) for delta in chunks(RESPONSE, 3)]
    streamed.append(text_guard.close())
    reference = direct(tiny_guard, [(ids_of(tokenizer, RESPONSE), "assistant")])[0]
    assert text_guard.token_ids == ids_of(tokenizer, RESPONSE)
    assert_same_verdicts(streamed, reference)


def test_byte_deltas_split_inside_characters_score_the_same(tiny_guard, tokenizer):
    data = RESPONSE.encode()
    text_guard = TextStreamGuard(tiny_guard)
    streamed = [text_guard.feed(data[i:i + 5]) for i in range(0, len(data), 5)]
    streamed.append(text_guard.close())
    reference = direct(tiny_guard, [(ids_of(tokenizer, RESPONSE), "assistant")])[0]
    assert_same_verdicts(streamed, reference)


def test_user_message_prompt_scores_user_turn_then_header_then_response(tiny_guard, tokenizer):
    response_ids = ids_of(tokenizer, RESPONSE)
    with TextStreamGuard(tiny_guard, prompt=PROMPT) as text_guard:
        assert text_guard.state.token_ids == PROMPT_USER_IDS + GENERATION_HEADER_IDS
        streamed = [text_guard.feed(delta) for delta in chunks(RESPONSE, 7)]
        streamed.append(text_guard.flush())
        assert text_guard.state.token_ids == (PROMPT_USER_IDS + GENERATION_HEADER_IDS
                                              + response_ids)
        prompt_verdicts = text_guard.prompt_verdicts
    user, _, response = direct(tiny_guard, [(PROMPT_USER_IDS, "user"),
                                            (GENERATION_HEADER_IDS, "assistant"),
                                            (response_ids, "assistant")])
    assert prompt_verdicts is not None and prompt_verdicts.role == "user"
    torch.testing.assert_close(prompt_verdicts.risk_probs, user.risk_probs, atol=1e-5, rtol=0)
    assert_same_verdicts(streamed, response)
    assert text_guard.state.closed


def test_token_id_prompt_is_fed_as_user(tiny_guard, tokenizer):
    prompt_ids = ids_of(tokenizer, "a question")
    text_guard = TextStreamGuard(tiny_guard, prompt=prompt_ids)
    streamed = [text_guard.feed("An answer."), text_guard.close()]
    user, response = direct(tiny_guard, [(prompt_ids, "user"),
                                         (ids_of(tokenizer, "An answer."), "assistant")])
    assert text_guard.prompt_verdicts is not None
    torch.testing.assert_close(text_guard.prompt_verdicts.risk_probs, user.risk_probs,
                               atol=1e-5, rtol=0)
    assert_same_verdicts(streamed, response)


def test_feed_returns_none_while_everything_is_held_back(tiny_guard, tokenizer):
    text_guard = TextStreamGuard(tiny_guard)
    try:
        assert text_guard.feed("Hel") is None
        assert text_guard.feed("lo wor").token_ids == tuple(ids_of(tokenizer, "Hello"))
        assert text_guard.pending_text == " wor"
        assert text_guard.flush().token_ids == tuple(ids_of(tokenizer, " wor"))
    finally:
        tiny_guard.close_stream(text_guard.state)


def test_bad_prompts_raise_naming_the_value(tiny_guard):
    with pytest.raises(ValueError, match=r"last prompt message must be the user turn"):
        TextStreamGuard(tiny_guard, prompt=[{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError, match=r"non-empty list of token ids, got \[1.5\]"):
        TextStreamGuard(tiny_guard, prompt=[1.5])  # type: ignore[list-item]


def test_closed_text_stream_raises(tiny_guard):
    text_guard = TextStreamGuard(tiny_guard)
    assert text_guard.close() is None
    with pytest.raises(StreamClosedError):
        text_guard.feed("more")


@pytest.fixture(scope="module")
def short_guard(tmp_path_factory, tiny_guard) -> StreamGuard:
    """The tiny shape with room for only 8 positions (reuses the loaded tokenizer)."""
    shape = dataclasses.replace(SHAPES["tiny"], max_positions=8)
    directory = make_random_checkpoint(tmp_path_factory.mktemp("short"), shape, seed=2)
    config = GuardConfig.from_json(directory / "config.json")
    model = load_model(directory, config, torch.device("cpu"), torch.float32)
    return StreamGuard(model, tiny_guard.tokenizer)


def test_failed_feed_keeps_the_text_pending(short_guard, tokenizer):
    with TextStreamGuard(short_guard) as text_guard:
        text_guard.feed("one two three four ")
        scored, pending = text_guard.token_ids, text_guard.pending_text
        with pytest.raises(ValueError, match=r"max_position_embeddings=8"):
            text_guard.feed("five six seven eight nine ten")
        assert text_guard.token_ids == scored
        assert text_guard.pending_text == pending
        assert text_guard.state.length == len(scored)


def test_a_raising_callback_leaves_the_text_guard_in_step(tokenizer, tmp_path):
    """A transition callback that raises used to leave the session holding the new ids while
    token_ids stayed empty; later text was then scored as the wrong tokens."""
    from qguard_stream import Hooks

    guard = StreamGuard.from_pretrained(make_random_checkpoint(tmp_path, "tiny", seed=1),
                                        device="cpu")
    guard.hooks = Hooks(errors="raise")
    calls = []

    def explode(event):
        calls.append(event)
        raise RuntimeError("callback failed")

    guard.hooks.on_token(explode)
    text_guard = TextStreamGuard(guard)
    pieces = chunks(RESPONSE, 7)
    for delta in pieces:
        try:
            text_guard.feed(delta)
        except RuntimeError as error:
            assert "callback failed" in str(error)
    try:
        text_guard.flush()
    except RuntimeError:
        pass
    assert calls, "the callback never ran, so nothing was tested"
    expected = ids_of(tokenizer, RESPONSE)
    assert text_guard.token_ids == expected
    assert text_guard.state.token_ids == expected  # the session holds exactly those ids


def test_text_rollback_keeps_tokenizer_and_session_in_step(tiny_guard, tokenizer):
    text_guard = TextStreamGuard(tiny_guard)
    text_guard.feed("The quick brown fox jumps over the lazy dog and then some")
    kept = text_guard.token_ids[:4]
    dropped = text_guard.rollback(4)
    assert dropped == " some"  # the held-back word is returned, never scored
    assert text_guard.token_ids == kept and text_guard.state.length == 4
    streamed = [text_guard.feed(" runs away"), text_guard.flush()]
    continuation = ids_of(tokenizer, " runs away")
    assert text_guard.token_ids == kept + continuation
    reference = direct(tiny_guard, [(kept + continuation, "assistant")])[0]
    torch.testing.assert_close(probs(streamed)[0], reference.risk_probs[len(kept):],
                               atol=1e-5, rtol=0)
    # a raw guard.rollback is followed, not silently desynchronised
    tiny_guard.rollback(text_guard.state, 2)
    text_guard.feed(" again")
    text_guard.flush()
    assert text_guard.token_ids == kept[:2] + ids_of(tokenizer, " again")
    assert text_guard.state.token_ids == text_guard.token_ids
    with pytest.raises(ValueError, match="response tokens"):
        text_guard.rollback(99)
    text_guard.close()
