"""`qguard-stream moderate`: one prompt (and optionally its response) through either model kind.

Prints one JSON object. Stream: the conversation's JSON, as the server's POST /v1/moderate answers
it (prompt verdict at the last user turn's <|im_end|>, per-token response verdicts over the
officially scored span, and the official decisions). Gen: the parsed `Safety / Categories /
Refusal` verdict with the raw text.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from qguard_stream.cli.models import add_model_arguments, load_guard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the user prompt")
    parser.add_argument("--response", default=None,
                        help="the assistant response (moderates the response when given)")
    parser.add_argument("--thinking", action="store_true",
                        help="stream: score the response from right after <think> (thinking trace)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="gen: decoding budget")


def run(args: argparse.Namespace) -> int:
    kind, guard = load_guard(args.model, args.kind, args.device, args.dtype)
    if kind == "gen":
        verdict = (guard.moderate_prompt(args.prompt, args.max_new_tokens)
                   if args.response is None else
                   guard.moderate_response(args.prompt, args.response, args.max_new_tokens))
        result: dict[str, Any] = {"model_kind": kind, **verdict.to_dict()}
    else:
        scores = stream_result(guard, args.prompt, args.response, args.thinking)
        result = {"model_kind": kind, **scores}
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


def stream_result(guard: Any, prompt: str, response: str | None, thinking: bool) -> dict:
    """The conversation's JSON (ConversationVerdict.to_json: the shape POST /v1/moderate
    answers)."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return guard.moderate_conversation(messages, thinking=thinking).to_json()
