"""The WebSocket protocol: client frames parsed into typed commands (verdicts are rendered by
qguard_stream.verdicts).

Client frames (JSON objects; "id" is optional and echoed back):
  {"type": "open", "messages": [...]}                 prompt scored with the query heads, then the
                                                      assistant header fed (the reply's "prompt"
                                                      verdict says if the policy flags it); or
  {"type": "open", "token_ids": [...], "role": "user"}  raw ids; or {"type": "open"} (empty); or
  {"type": "open", "spans": [{"token_ids": [...], "role": "user"}, ...], "judge_from": N,
   "held": K}                                         a session resumed from its history: the
                                                      spans rescored in order, the policy judging
                                                      positions >= judge_from (default: none of
                                                      the spans), the last K ids' text held back
  An open with "return_spans": true lists the ids it scored, by role, in the reply's "spans".
  {"type": "feed", "session": 1, "token_ids": [...] | "text": "...", "role": "assistant"}
                                                      text: a delta of the session's running text,
                                                      re-tokenized incrementally; the unstable tail
                                                      waits for more text or "final": true
  {"type": "rollback", "session": 1, "length": 42}
  {"type": "close", "session": 1}
An open may also set the session's "policy" ("official", the default, | "strict" |
"threshold:P") and "holdback" (default 0): a text feed's reply carries "released", the text of
the scored tokens that have `holdback` scored tokens after them, never a token of the policy's
flagged run (nothing at all after it); "final": true releases the rest.
"session" may be left out while the connection holds exactly one session.
This module validates shapes and sizes (ServerLimits: frame bytes and JSON nesting here; text and
tokens per feed and held-back text where they are used); values (ranges) are checked where used.
"""

from __future__ import annotations

import hmac
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from qguard_stream.policy import OFFICIAL, GuardPolicy
from qguard_stream.verdicts import ROLES

COMMAND_TYPES = ("open", "feed", "rollback", "close")
MAX_HOLDBACK = 64  # tokens a session may hold back before releasing their text


class ProtocolError(ValueError):
    """A malformed client frame; the message is sent back in an error frame."""


class SessionUnknownError(ProtocolError):
    """A frame names a session this connection or server does not hold (never opened, closed,
    expired, or held by a replica that is gone): error code "session_unknown", HTTP 404. A
    client that kept the session's history re-opens it with "spans" and goes on."""


class TooLargeError(ProtocolError):
    """A frame, body, feed or held-back text over a ServerLimits bound (error code "too_large",
    HTTP 413); refused before the work it would cost."""


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one client can ask of the server in one frame or request."""

    max_frame_bytes: int = 1 << 20  # a WebSocket frame or an HTTP body
    max_json_depth: int = 32  # nesting of objects and arrays in a frame
    max_feed_text_chars: int = 256 * 1024  # text of one feed, or of an open's messages together
    max_feed_tokens: int = 16384  # token ids scored by one frame (given, or from its text)
    max_pending_chars: int = 16384  # text held back (an unfinished word) between text feeds
    max_resume_tokens: int = 262144  # token ids of one resumed session's history ("spans")

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerLimits.{item.name} must be a positive int, got "
                                 f"{value!r}")

    def check_tokens(self, count: int, what: str) -> None:
        if count > self.max_feed_tokens:
            raise TooLargeError(f"{what} has {count} tokens; the server takes at most "
                                f"{self.max_feed_tokens} per frame (max_feed_tokens)")

    def check_text(self, chars: int, what: str) -> None:
        if chars > self.max_feed_text_chars:
            raise TooLargeError(f"{what} has {chars} characters; the server takes at most "
                                f"{self.max_feed_text_chars} per frame (max_feed_text_chars)")


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def load_json(frame: str | bytes, limits: ServerLimits) -> Any:
    """Parse a frame or body as JSON within the limits' size and nesting depth (checked before
    the parser, whose recursion a deeply nested frame would exhaust)."""
    if len(frame) > limits.max_frame_bytes:
        raise TooLargeError(f"frame of {len(frame)} bytes exceeds the server's limit of "
                            f"{limits.max_frame_bytes} (max_frame_bytes)")
    if isinstance(frame, bytes):
        try:
            frame = frame.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ProtocolError(f"frame is not valid UTF-8: {error}") from None
    brackets = _BRACKETS.findall(_STRINGS.sub("", frame))
    depth = max(itertools.accumulate(1 if b in "[{" else -1 for b in brackets), default=0)
    if depth > limits.max_json_depth:
        raise ProtocolError(f"frame is nested {depth} levels deep; the server takes at most "
                            f"{limits.max_json_depth} (max_json_depth)")
    try:
        return json.loads(frame)
    except (json.JSONDecodeError, RecursionError) as error:
        raise ProtocolError(f"frame is not valid JSON: {error}") from None


@dataclass(frozen=True)
class Command:
    type: str
    request_id: Any = None
    session: int | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    text: str | None = None
    role: str = "assistant"
    length: int | None = None
    final: bool = False  # text feeds: flush the held-back tail after this delta
    policy: GuardPolicy = OFFICIAL  # open: the session's decision policy
    holdback: int = 0  # open: scored tokens held back before their text is released
    spans: tuple[tuple[str, list[int]], ...] | None = None  # open: a resumed session's history
    judge_from: int | None = None  # open with spans: the first position the policy judges
    held: int = 0  # open with spans: trailing ids whose text is still held back
    return_spans: bool = False  # open: the reply lists the ids it scored, by role (for resume)


def parse_command(frame: str | bytes, limits: ServerLimits | None = None) -> Command:
    """Parse one client frame, or raise ProtocolError (TooLargeError) naming what is wrong."""
    limits = limits or ServerLimits()
    raw = load_json(frame, limits)
    if not isinstance(raw, dict):
        raise ProtocolError(f"frame must be a JSON object, got {type(raw).__name__}")
    kind = raw.get("type")
    if kind not in COMMAND_TYPES:
        raise ProtocolError(f"'type' must be one of {COMMAND_TYPES}, got {kind!r}")
    default_role = "user" if kind == "open" else "assistant"
    command = Command(
        type=kind, request_id=raw.get("id"), session=_optional_int(raw, "session"),
        messages=raw.get("messages"), token_ids=_optional_ids(raw), text=raw.get("text"),
        role=raw.get("role", default_role), length=_optional_int(raw, "length"),
        final=raw.get("final", False), policy=_policy(raw, kind),
        holdback=_holdback(raw, kind), spans=_spans(raw, kind, limits),
        judge_from=_optional_int(raw, "judge_from"), held=_optional_int(raw, "held") or 0,
        return_spans=raw.get("return_spans", False),
    )
    _check(command)
    if command.token_ids is not None:
        limits.check_tokens(len(command.token_ids), "'token_ids'")
    if command.text is not None:
        limits.check_text(len(command.text), "'text'")
    if isinstance(command.messages, list):
        limits.check_text(sum(len(m.get("content", "")) for m in command.messages
                              if isinstance(m, dict) and isinstance(m.get("content"), str)),
                          "'messages'")
    return command


def _check(command: Command) -> None:
    if command.role not in ROLES:
        raise ProtocolError(f"'role' must be one of {ROLES}, got {command.role!r}")
    if command.text is not None and not isinstance(command.text, str):
        raise ProtocolError(f"'text' must be a string, got {command.text!r}")
    if not isinstance(command.final, bool):
        raise ProtocolError(f"'final' must be true or false, got {command.final!r}")
    if not isinstance(command.return_spans, bool):
        raise ProtocolError(f"'return_spans' must be true or false, got "
                            f"{command.return_spans!r}")
    if command.type == "feed" and (command.token_ids is None) == (command.text is None):
        raise ProtocolError("'feed' needs exactly one of 'token_ids' and 'text'")
    if command.type == "open" and command.messages is not None and command.token_ids is not None:
        raise ProtocolError("'open' takes 'messages' or 'token_ids', not both")
    if command.type == "rollback" and command.length is None:
        raise ProtocolError("'rollback' needs an integer 'length'")
    if command.spans is None and (command.judge_from is not None or command.held):
        raise ProtocolError("'judge_from' and 'held' go with 'spans' (a resumed session)")
    if command.spans is not None:
        if command.messages is not None or command.token_ids is not None:
            raise ProtocolError("'open' takes one of 'messages', 'token_ids' and 'spans'")
        total = sum(len(ids) for _, ids in command.spans)
        judge_from = total if command.judge_from is None else command.judge_from
        if not 0 <= judge_from <= total:
            raise ProtocolError(f"'judge_from' must be in [0, {total}] (the spans' length), "
                                f"got {judge_from}")
        if not 0 <= command.held <= total - judge_from:
            raise ProtocolError(f"'held' must be in [0, {total - judge_from}] (ids judged), "
                                f"got {command.held}")


def _spans(raw: dict[str, Any], kind: str, limits: ServerLimits
           ) -> tuple[tuple[str, list[int]], ...] | None:
    spans = raw.get("spans")
    if spans is None:
        return None
    if kind != "open":
        raise ProtocolError(f"'spans' resume a session when it opens, not in {kind!r}")
    if not isinstance(spans, list) or not spans:
        raise ProtocolError("'spans' must be a non-empty list of {\"token_ids\", \"role\"}")
    out = []
    for index, span in enumerate(spans):
        if not isinstance(span, dict) or span.get("role") not in ROLES:
            raise ProtocolError(f"spans[{index}] must be {{\"token_ids\": [...], \"role\": "
                                f"one of {ROLES}}}, got {span!r:.80}")
        ids = _optional_ids(span)
        if ids is None:
            raise ProtocolError(f"spans[{index}] has no 'token_ids'")
        out.append((span["role"], ids))
    total = sum(len(ids) for _, ids in out)
    if total > limits.max_resume_tokens:
        raise TooLargeError(f"'spans' hold {total} tokens; the server resumes at most "
                            f"{limits.max_resume_tokens} (max_resume_tokens)")
    return tuple(out)


def _policy(raw: dict[str, Any], kind: str) -> GuardPolicy:
    if "policy" not in raw:
        return OFFICIAL
    if kind != "open":
        raise ProtocolError(f"'policy' is set when a session opens, not in {kind!r}")
    try:
        return GuardPolicy.parse(raw["policy"])
    except ValueError as error:
        raise ProtocolError(f"'policy': {error}") from None


def _holdback(raw: dict[str, Any], kind: str) -> int:
    if "holdback" not in raw:
        return 0
    if kind != "open":
        raise ProtocolError(f"'holdback' is set when a session opens, not in {kind!r}")
    value = raw["holdback"]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_HOLDBACK:
        raise ProtocolError(f"'holdback' must be an integer in [0, {MAX_HOLDBACK}], got "
                            f"{value!r}")
    return value


def _optional_int(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ProtocolError(f"{key!r} must be an integer, got {value!r}")
    return value


def _optional_ids(raw: dict[str, Any]) -> list[int] | None:
    ids = raw.get("token_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ProtocolError(f"'token_ids' must be a non-empty list of integers, got {ids!r:.80}")
    return ids


def is_authorized(headers: Mapping[str, str], api_key: str | None) -> bool:
    """True without a key, else only for `Authorization: Bearer <key>`."""
    if api_key is None:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())
