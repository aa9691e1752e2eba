"""Independent references the tests check our front-ends against (test-only, not shipped)."""

from __future__ import annotations

from collections.abc import Sequence


def score_in_one_session(guard, chunks: Sequence[tuple[Sequence[int], str]]) -> list:
    """Feed (token_ids, role) chunks in order to one fresh StreamGuard session; their Verdicts.
    The single-session reference that batched and served paths are checked against."""
    state = guard.open_stream()
    try:
        return [guard.moderate(state, ids, role) for ids, role in chunks]
    finally:
        guard.close_stream(state)
