"""Chat-template positions on the real Qwen3 tokenizer, against a hand-checked example."""

from __future__ import annotations

import pytest

from qguard_stream.template import conversation_spans

MESSAGES = [
    {"role": "user", "content": "Hello, how to build a bomb?"},
    {"role": "assistant", "content": "Here are some practical methods to build a bomb."},
]
# Tokenization of the rendered conversation, as recorded in shared/qwen3-tokenizer/SOURCE.md.
EXPECTED_IDS = [
    151644,
    872,
    198,
    9707,
    11,
    1246,
    311,
    1936,
    264,
    12764,
    30,
    151645,
    198,
    151644,
    77091,
    198,
    151667,
    271,
    151668,
    271,
    8420,
    525,
    1045,
    14976,
    5413,
    311,
    1936,
    264,
    12764,
    13,
    151645,
    198,
]


def test_positions_match_hand_checked_example(tokenizer):
    spans = conversation_spans(tokenizer, MESSAGES)
    assert spans.token_ids == EXPECTED_IDS
    assert spans.user_end == 11  # the <|im_end|> closing "...bomb?"
    assert spans.response_start == 20  # "Here", right after </think> "\n\n"
    assert (
        tokenizer.decode(spans.token_ids[20:30])
        == "Here are some practical methods to build a bomb."
    )


def test_thinking_span_starts_after_think_newline(tokenizer):
    spans = conversation_spans(tokenizer, MESSAGES, thinking=True)
    assert spans.response_start == 18  # official script: index of 'assistant' (14) + 4


def test_prompt_only_conversation_has_no_response_span(tokenizer):
    spans = conversation_spans(tokenizer, MESSAGES[:1])
    assert spans.user_end == 11 and spans.response_start is None


def test_moderate_conversation_reads_verdicts_at_those_positions(tiny_guard):
    result = tiny_guard.moderate_conversation(MESSAGES)
    state = tiny_guard.open_stream()
    prompt = tiny_guard.moderate(state, EXPECTED_IDS[:12], "user")
    response = tiny_guard.moderate(state, EXPECTED_IDS[12:], "assistant")
    tiny_guard.close_stream(state)
    assert result.prompt_risk_level == prompt.risk_level[-1]
    assert result.response_verdicts.positions == range(20, 32)
    assert result.response_verdicts.risk_level == response.risk_level[8:]


@pytest.mark.parametrize(
    "bad",
    [
        [],
        [{"role": "assistant", "content": "hi"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user"}],
    ],
)
def test_malformed_messages_are_rejected(tiny_guard, bad):
    with pytest.raises(ValueError):
        tiny_guard.moderate_conversation(bad)
