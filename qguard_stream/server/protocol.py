"""The WebSocket protocol: client frames parsed into typed commands (verdicts are rendered by
qguard_stream.verdicts).

Client frames (JSON objects; "id" is optional and echoed back):
  {"type": "open", "messages": [...]}                 prompt scored with the query heads, then the
                                                      assistant header fed; or
  {"type": "open", "token_ids": [...], "role": "user"}  raw ids; or {"type": "open"} (empty)
  {"type": "feed", "session": 1, "token_ids": [...] | "text": "...", "role": "assistant"}
                                                      text: a delta of the session's running text,
                                                      re-tokenized incrementally; the unstable tail
                                                      waits for more text or "final": true
  {"type": "rollback", "session": 1, "length": 42}
  {"type": "close", "session": 1}
"session" may be left out while the connection holds exactly one session.
This module validates shapes only; values (ranges, lengths) are checked where they are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qguard_stream.verdicts import ROLES

COMMAND_TYPES = ("open", "feed", "rollback", "close")


class ProtocolError(ValueError):
    """A malformed client frame; the message is sent back in an error frame."""


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


def parse_command(frame: str | bytes) -> Command:
    """Parse one client frame, or raise ProtocolError naming what is wrong."""
    try:
        raw = json.loads(frame)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProtocolError(f"frame is not valid JSON: {error}") from None
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
        final=raw.get("final", False),
    )
    _check(command)
    return command


def _check(command: Command) -> None:
    if command.role not in ROLES:
        raise ProtocolError(f"'role' must be one of {ROLES}, got {command.role!r}")
    if command.text is not None and not isinstance(command.text, str):
        raise ProtocolError(f"'text' must be a string, got {command.text!r}")
    if not isinstance(command.final, bool):
        raise ProtocolError(f"'final' must be true or false, got {command.final!r}")
    if command.type == "feed" and (command.token_ids is None) == (command.text is None):
        raise ProtocolError("'feed' needs exactly one of 'token_ids' and 'text'")
    if command.type == "open" and command.messages is not None and command.token_ids is not None:
        raise ProtocolError("'open' takes 'messages' or 'token_ids', not both")
    if command.type == "rollback" and command.length is None:
        raise ProtocolError("'rollback' needs an integer 'length'")


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
