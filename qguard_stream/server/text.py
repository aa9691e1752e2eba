"""Text to token ids for the server.

Text feeds of a session are deltas of one running text: they go through an IncrementalTokenizer,
so the ids scored equal the tokenization of the whole text however it was split (inside words,
inside UTF-8 characters); the unstable tail waits for more text or a final feed.
"""

from __future__ import annotations

from typing import Any

from qguard_stream.integrations.retokenize import IncrementalTokenizer
from qguard_stream.template import prompt_spans


def text_stream(tokenizer: Any) -> IncrementalTokenizer:
    """A session's incremental re-tokenizer (raises if the model ships no tokenizer)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: feed token_ids instead of text")
    return IncrementalTokenizer(tokenizer)


def prompt_and_header_ids(tokenizer: Any, messages: Any) -> tuple[list[int], list[int]]:
    """The templated prompt through the last user turn's <|im_end|>, and the assistant header
    after which response scoring starts (template.prompt_spans)."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: open with token_ids instead of messages")
    return prompt_spans(tokenizer, messages)
