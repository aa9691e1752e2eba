"""Text to token ids for the server, kept apart so an incremental re-tokenizer can replace it.

Limitation: each text feed is tokenized on its own, so a word split across two feeds becomes
different tokens than the whole text would; send whole words (or token ids) per feed.
"""

from __future__ import annotations

from typing import Any

from qguard_stream.template import conversation_spans


def text_to_ids(tokenizer: Any, text: str) -> list[int]:
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: feed token_ids instead of text")
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("text is empty: nothing to moderate")
    return ids


def prompt_and_header_ids(tokenizer: Any, messages: Any) -> tuple[list[int], list[int]]:
    """The templated prompt through the last user turn's <|im_end|>, and the assistant header
    (`\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`) after which response scoring
    starts."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: open with token_ids instead of messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
            or messages[-1].get("role") == "assistant":
        raise ValueError("'messages' must be a non-empty list ending with a user (or system) turn")
    spans = conversation_spans(tokenizer, [*messages, {"role": "assistant", "content": ""}])
    assert spans.response_start is not None
    ids = spans.token_ids
    return ids[: spans.user_end + 1], ids[spans.user_end + 1: spans.response_start]
