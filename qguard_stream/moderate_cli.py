"""`qguard-stream moderate`: one prompt (and optionally its response) through either model kind.

Prints one JSON object. Stream: the prompt verdict at the last user turn's <|im_end|> and the
response verdict by `policy.consecutive_unsafe` over the officially scored response tokens. Gen:
the parsed `Safety / Categories / Refusal` verdict with the raw text.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from qguard_stream.model_kind import add_model_arguments, load_guard
from qguard_stream.policy import consecutive_unsafe


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
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    verdict = guard.moderate_conversation(messages, thinking=thinking)
    result: dict[str, Any] = {"prompt": {"risk_level": verdict.prompt_risk_level,
                                         "category": verdict.prompt_category}}
    if verdict.response_verdicts is not None:
        levels = verdict.response_verdicts.risk_level
        level, flag = consecutive_unsafe(levels)
        result["response"] = {
            "risk_level": level,
            "category": verdict.response_verdicts.category[flag] if flag >= 0 else None,
            "flagged_token": flag if flag >= 0 else None,  # index among the scored tokens
            "scored_tokens": len(levels),
        }
    return result
