"""The server's response decision: the official rule (qguard_stream.policy.ConsecutiveUnsafe,
loose mode) over one session's response tokens, rendered as JSON.

Live streaming, the one-shot endpoint and offline evaluation therefore share one rule. This module
only adapts the policy to the wire format; it must not re-implement it.
"""

from __future__ import annotations

from typing import Any

from qguard_stream.hooks import token_verdicts
from qguard_stream.policy import ConsecutiveUnsafe, Decision
from qguard_stream.stream import Verdicts


def flag_json(decision: Decision) -> dict[str, Any]:
    return {"position": decision.position, "risk_level": decision.label,
            "category": decision.category}


class ConsecutiveUnsafeTracker:
    """Per-session state of the official rule over response tokens, with rollback."""

    def __init__(self) -> None:
        self.policy = ConsecutiveUnsafe()

    def update(self, verdicts: Verdicts) -> list[dict[str, Any]]:
        """Add scored response tokens; return the flags they raised, as JSON."""
        raised = [self.policy.observe(token) for token in token_verdicts(verdicts)]
        return [flag_json(decision) for decision in raised if decision is not None]

    def rollback(self, length: int) -> None:
        """Forget tokens at positions >= length."""
        self.policy.truncate(length)

    def decision(self) -> dict[str, Any]:
        """{"risk_level", "category", "flag_position"} of the response so far."""
        verdict = self.policy.verdict()
        if not verdict.flagged:
            return {"risk_level": "Safe", "category": None, "flag_position": None}
        return {"risk_level": verdict.label, "category": verdict.category,
                "flag_position": verdict.position}
