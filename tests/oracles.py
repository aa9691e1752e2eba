"""Independent references the tests check our front-ends against (test-only, not shipped)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest


def score_in_one_session(guard, chunks: Sequence[tuple[Sequence[int], str]]) -> list:
    """Feed (token_ids, role) chunks in order to one fresh StreamGuard session; their Verdicts.
    The single-session reference that batched and served paths are checked against."""
    state = guard.open_stream()
    try:
        return [guard.moderate(state, ids, role) for ids, role in chunks]
    finally:
        guard.close_stream(state)


# ---- a scripted session, for comparing served sessions that were or were not interrupted ------
PROMPT = [{"role": "user", "content": "How do I bake bread?"}]
TEXT = ("Mix flour and water — knead ten minutes; 日本語 café, then bake. Let it rest an hour "
        "before you slice it, or the crumb turns gummy.")
# The reply fields a resumed session must give exactly as an uninterrupted one does.
COMPARED = ("token_ids", "start", "risk_level", "category", "flags", "decision", "released",
            "pending_text", "held_tokens", "length")


def script() -> list[tuple[str, object]]:
    """Text deltas split inside words and characters, a rollback, token ids, a final flush."""
    steps: list[tuple[str, object]] = [("text", TEXT[i:i + 7]) for i in range(0, 70, 7)]
    steps += [("rollback", -3), ("text", TEXT[70:90]), ("final", TEXT[90:])]
    steps += [("ids", [1234, 5678, 91]), ("text", " And"), ("final", " done.")]
    return steps


def run(session, step: tuple[str, object]) -> dict:
    kind, value = step
    if kind == "rollback":
        return session.rollback(session.length + value)
    if kind == "ids":
        return session.feed(token_ids=value)
    return session.feed(text=value, final=kind == "final")


def same(actual: dict, expected: dict) -> None:
    for key in COMPARED:
        assert actual.get(key) == expected.get(key), key
    for key in ("risk_prob", "category_prob"):
        assert actual.get(key) == pytest.approx(expected.get(key), abs=1e-4)


def expected_replies(reference, transport: str) -> list[dict]:
    """The script's replies on a server (`reference.url`) that never loses the session."""
    from qguard_stream.client import SessionClient

    with SessionClient(reference.url, transport=transport) as client:
        session = client.open(messages=PROMPT, holdback=2)
        replies = [run(session, step) for step in script()]
        session.close()
    return replies
