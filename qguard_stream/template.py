"""Chat-template positions: where the prompt verdict is read and where response scoring starts.

Mirrors the official evaluation (QwenLM/Qwen3Guard eval/eval_stream.py): the conversation is
rendered with enable_thinking=False; the prompt verdict is read at the <|im_end|> closing the last
user turn; response scoring starts after `</think>` + "\\n\\n" (or right after
`<|im_start|>assistant\\n<think>\\n` when the thinking trace is moderated) and runs to the end of
the sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConversationSpans:
    token_ids: list[int]
    user_end: int  # index of the <|im_end|> closing the last user turn
    response_start: int | None  # first scored response index; None without an assistant turn


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Raise ValueError naming the first malformed message; return the list unchanged."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must be a dict with a string 'content', got {message!r}")
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {message.get('role')!r}")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("messages hold no user turn: nothing to read a prompt verdict from")
    return messages


def text_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages as the chat template takes them: string contents (text parts of a
    list content joined), system/user/assistant roles; ValueError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object, got {message!r:.60}")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{index}].role {role!r} cannot be moderated "
                             f"(system, user and assistant can)")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content
                              if isinstance(part, dict) and part.get("type") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string or text parts")
        out.append({"role": role, "content": content})
    return out


def conversation_spans(tokenizer: Any, messages: list[dict[str, str]],
                       thinking: bool = False) -> ConversationSpans:
    validate_messages(messages)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                         enable_thinking=False)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    token = tokenizer.convert_tokens_to_ids
    im_start, im_end, user, assistant = (token("<|im_start|>"), token("<|im_end|>"),
                                         token("user"), token("assistant"))
    user_start = _last_pair(ids, im_start, user)
    user_end = ids.index(im_end, user_start + 2)
    response_start = None
    if messages[-1]["role"] == "assistant":
        turn = _first_pair(ids, im_start, assistant, after=user_end)
        if thinking:
            response_start = turn + 5  # <|im_start|> assistant \n <think> \n | trace...
        else:
            think_end = _first_pair(ids, token("</think>"), _single_id(tokenizer, "\n\n"),
                                    after=turn)
            response_start = think_end + 2
    return ConversationSpans(ids, user_end, response_start)


def prompt_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """A prompt about to be answered: (ids through the last user turn's <|im_end|>, scored with
    the query heads; the assistant header the generation prompt adds, after which response
    scoring starts). Rendered as at generation time (add_generation_prompt=True,
    enable_thinking=False); the messages must end with the user turn."""
    validate_messages(messages)
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last prompt message must be the user turn, got role "
                         f"{messages[-1]['role']!r}")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end not in ids:
        raise ValueError(f"the chat template rendered no <|im_end|>: {text!r}")
    user_end = len(ids) - 1 - ids[::-1].index(im_end)  # the generation prompt holds none
    return ids[:user_end + 1], ids[user_end + 1:]


def im_end_id(tokenizer: Any, fallback: int | None) -> int | None:
    """The id of <|im_end|>: from the tokenizer when there is one, else `fallback` (a Qwen3Guard
    config's eos_token_id is <|im_end|>)."""
    if tokenizer is None:
        return fallback
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def split_prompt_ids(ids: Sequence[int], im_end: int | None) -> tuple[list[int], list[int]]:
    """Prompt ids already templated, cut as prompt_spans cuts messages: (the user part through
    the last <|im_end|>, scored with the query heads; the rest, the assistant header, scored
    with the response heads). Without an <|im_end|> the whole prompt is the user part."""
    ids = [int(t) for t in ids]
    if im_end is None or im_end not in ids:
        return ids, []
    cut = len(ids) - ids[::-1].index(im_end)
    return ids[:cut], ids[cut:]


def _single_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not a single token for this tokenizer: {ids}")
    return ids[0]


def _last_pair(ids: list[int], first: int, second: int) -> int:
    for i in range(len(ids) - 2, -1, -1):
        if ids[i] == first and ids[i + 1] == second:
            return i
    raise ValueError(f"token pair ({first}, {second}) not found in the templated conversation")


def _first_pair(ids: list[int], first: int, second: int, after: int = 0) -> int:
    for i in range(after, len(ids) - 1):
        if ids[i] == first and ids[i + 1] == second:
            return i
    raise ValueError(f"token pair ({first}, {second}) not found after index {after}")
