"""A whole conversation scored at the positions the official evaluation reads, and its one JSON.

`plan_conversation` renders the chat (template.conversation_spans) and cuts it into the two chunks
a session scores: the prompt through the last user turn's <|im_end|> (query heads; the prompt
verdict is the last one) and the rest (response heads; the response verdicts start at the span's
`response_start`). `ConversationPlan.verdict` assembles the result from the two scored chunks.
StreamGuard.moderate_conversation and the server's POST /v1/moderate both drive a session through
a plan and render `ConversationVerdict.to_json()`, so the library, the CLI and the server agree.
The response decision is the official rule (policy.ConsecutiveUnsafe, loose mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from qguard_stream.hooks import Monitor, token_verdicts
from qguard_stream.policy import ConsecutiveUnsafe, Decision, decision_json
from qguard_stream.template import ConversationSpans, conversation_spans
from qguard_stream.verdicts import Verdicts, last_verdict_json, verdicts_json


@dataclass(frozen=True)
class ConversationVerdict:
    """Result of moderating a conversation."""

    token_ids: list[int]
    user_end: int  # index of the <|im_end|> closing the last user turn
    response_start: int | None  # first scored response position (None: no assistant turn)
    prompt_verdicts: Verdicts  # query heads over the prompt part; the verdict is the last one
    response_verdicts: Verdicts | None  # response heads over token_ids[response_start:]

    @property
    def prompt_risk_level(self) -> str:
        return self.prompt_verdicts.risk_level[-1]

    @property
    def prompt_category(self) -> str:
        return self.prompt_verdicts.category[-1]

    @cached_property
    def response_decision(self) -> Decision | None:
        """The official decision over the response tokens (None without a response): equals
        policy.consecutive_unsafe over their levels."""
        if self.response_verdicts is None:
            return None
        monitor = Monitor(policy=ConsecutiveUnsafe())  # the one tracker, as a live stream uses
        monitor.record(-1, token_verdicts(self.response_verdicts))
        assert monitor.policy is not None
        return monitor.policy.verdict()

    def to_json(self) -> dict[str, Any]:
        """{"prompt": verdict at the prompt's last position, "response": per-token verdicts or
        null, "decision": {"prompt": {risk_level, category}, "response": {risk_level, category,
        flag_position} or null}}."""
        prompt = last_verdict_json(self.prompt_verdicts)
        response = self.response_verdicts
        decision = self.response_decision
        return {
            "prompt": prompt,
            "response": verdicts_json(response) if response is not None else None,
            "decision": {
                "prompt": {"risk_level": prompt["risk_level"], "category": prompt["category"]},
                "response": decision_json(decision) if decision is not None else None,
            },
        }


@dataclass(frozen=True)
class ConversationPlan:
    """A rendered conversation and the two chunks to score, in order."""

    spans: ConversationSpans

    @property
    def prompt_ids(self) -> list[int]:
        """Scored with role "user": the prompt through the last user turn's <|im_end|>."""
        return self.spans.token_ids[: self.spans.user_end + 1]

    @property
    def rest_ids(self) -> list[int] | None:
        """Scored with role "assistant" after the prompt (None: no assistant turn to score)."""
        if self.spans.response_start is None:
            return None
        return self.spans.token_ids[self.spans.user_end + 1:]

    def verdict(self, prompt: Verdicts, rest: Verdicts | None) -> ConversationVerdict:
        """The result, from the Verdicts of prompt_ids and of rest_ids (None when not scored)."""
        spans = self.spans
        response = None
        if rest is not None and spans.response_start is not None:
            response = rest.since(spans.response_start)
        return ConversationVerdict(spans.token_ids, spans.user_end, spans.response_start, prompt,
                                   response)


def plan_conversation(tokenizer: Any, messages: list[dict[str, str]],
                      thinking: bool = False) -> ConversationPlan:
    """Render `messages` and cut them as the official evaluation scores them; ValueError for
    malformed messages, RuntimeError without a tokenizer."""
    if tokenizer is None:
        raise RuntimeError("this guard has no tokenizer; load a checkpoint that ships one")
    return ConversationPlan(conversation_spans(tokenizer, messages, thinking=thinking))
