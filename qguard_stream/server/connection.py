"""One WebSocket connection's sessions and the handling of its frames.

Sessions are numbered per connection and live only in this object, so no other connection can reach
them; `close_all` frees them when the connection ends, however it ends. A frame that fails yields an
error frame and leaves every session as it was.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from qguard_stream.engine import AsyncEngine, PoolExhaustedError, Session, SessionBusyError
from qguard_stream.hooks import Monitor, token_verdicts
from qguard_stream.integrations.retokenize import HeldText, IncrementalTokenizer, TokenText
from qguard_stream.policy import decision_json, flag_json
from qguard_stream.server.protocol import (
    Command,
    ProtocolError,
    ServerLimits,
    SessionUnknownError,
    TooLargeError,
    parse_command,
)
from qguard_stream.server.text import prompt_and_header_ids, text_stream
from qguard_stream.verdicts import (
    NonFiniteScoresError,
    StreamClosedError,
    Verdicts,
    empty_verdicts_json,
    last_verdict_json,
    verdicts_json,
)

log = logging.getLogger(__name__)
OFF_LOOP_BYTES = 64 * 1024  # frames larger than this are parsed in a worker thread


@dataclass(eq=False)
class LiveSession:
    """An engine session plus its Monitor: the library's one tracker of transitions and of the
    session's decision policy (official by default), judging assistant tokens fed after the
    session was opened (not the prompt or the assistant header an open scores); and the text of
    text feeds, held back until it may be released (HeldText)."""

    session: Session
    monitor: Monitor
    holdback: int = 0
    text: IncrementalTokenizer | None = None  # the running text of "text" feeds, once there is one
    held: HeldText | None = None  # scored text-feed ids whose text is not released yet
    last_used: float = field(default_factory=time.monotonic)

    def record(self, verdicts: Verdicts) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Feed a scored call to the monitor; its transitions and flags, as JSON."""
        transitions, flags = [], []
        for kind, event in self.monitor.record(self.session.id, token_verdicts(verdicts)):
            if kind == "transition":
                transitions.append({"position": event.position, "role": event.role,
                                    "from": event.previous_level, "to": event.level})
            elif kind == "flag":
                flags.append(flag_json(event.decision))
        return transitions, flags

    def decision(self) -> dict[str, Any]:
        """The official decision over the judged tokens so far, as JSON."""
        assert self.monitor.policy is not None
        return decision_json(self.monitor.policy.verdict())

    def release(self, final: bool) -> str:
        """The text of text-fed tokens now safe to show (see HeldText)."""
        if self.held is None:
            return ""
        stop = self.monitor.stop_decision
        return self.held.release(None if stop is None else stop.start_position, final)

    def rollback(self, length: int) -> None:
        """Forget positions >= length; text still held back (not yet scored) is dropped too."""
        self.monitor.truncate(length)
        self.text = None
        if self.held is not None:
            self.held.truncate(length)

    def pending_text(self) -> str:
        return self.text.pending_text if self.text is not None else ""


def error_frame(message: str, code: str, command: Command | None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "code": code, "error": message}
    if command is not None:
        frame.update(id=command.request_id, session=command.session, request=command.type)
    return frame


class Connection:
    """The sessions of one WebSocket connection."""

    def __init__(self, engine: AsyncEngine, tokenizer: Any,
                 limits: ServerLimits | None = None, replica: str | None = None) -> None:
        self.engine, self.replica = engine, replica
        self.tokenizer = tokenizer
        self.limits = limits or ServerLimits()
        self.sessions: dict[int, LiveSession] = {}
        self._next_id = 1
        self._token_text: TokenText | None = None

    async def handle_frame(self, frame: str | bytes) -> dict[str, Any]:
        """Answer one client frame: a reply, or an error frame naming what was wrong."""
        command = None
        try:
            if len(frame) > OFF_LOOP_BYTES:  # parsing a large frame leaves the event loop
                command = await asyncio.to_thread(parse_command, frame, self.limits)
            else:
                command = parse_command(frame, self.limits)
            handler = {"open": self.open, "feed": self.feed, "rollback": self.rollback,
                       "close": self.close}[command.type]
            reply = await handler(command)
        except PoolExhaustedError as error:
            return error_frame(str(error), "pool_exhausted", command)
        except TooLargeError as error:
            return error_frame(str(error), "too_large", command)
        except SessionUnknownError as error:
            return error_frame(str(error), "session_unknown", command)
        except NonFiniteScoresError as error:
            return error_frame(str(error), "model_error", command)
        except (ProtocolError, ValueError, TypeError, StreamClosedError,
                SessionBusyError) as error:
            return error_frame(str(error), "bad_request", command)
        except Exception as error:  # never a silent close: the client learns what failed
            log.exception("frame failed")
            return error_frame(f"internal error: {type(error).__name__}: {error}", "internal",
                               command)
        if command.session is not None and command.session in self.sessions:
            self.sessions[command.session].last_used = time.monotonic()  # idle from its end
        if command.request_id is not None:
            reply["id"] = command.request_id
        if self.replica is not None and reply["type"] == "opened":
            reply["replica"] = self.replica
        return reply

    async def open(self, command: Command) -> dict[str, Any]:
        prompt_ids = header_ids = None
        if command.messages is not None:  # tokenize first (off the loop): a bad body opens nothing
            prompt_ids, header_ids = await asyncio.to_thread(
                prompt_and_header_ids, self.tokenizer, command.messages)
            opened_length = len(prompt_ids) + len(header_ids)
            self.limits.check_tokens(opened_length, "the templated 'messages'")
        elif command.spans is not None:
            return await self.resume(command)
        else:
            opened_length = len(command.token_ids or [])
        # The policy judges what is fed after the open, not the prompt or header scored here.
        live = LiveSession(await self.engine.open(),
                           Monitor(policy=command.policy.response_policy(),
                                   policy_start=opened_length), holdback=command.holdback)
        reply: dict[str, Any] = {"type": "opened"}
        try:
            if prompt_ids is not None and header_ids is not None:
                prompt = await self.engine.moderate(live.session, prompt_ids, "user")
                live.record(prompt)
                live.record(await self.engine.moderate(live.session, header_ids, "assistant"))
                reply["prompt"] = {**last_verdict_json(prompt),
                                   "flagged": command.policy.prompt_flagged(prompt)}
            elif command.token_ids is not None:
                verdicts = await self.engine.moderate(live.session, command.token_ids,
                                                      command.role)
                live.record(verdicts)
                reply["verdict"] = last_verdict_json(verdicts)
        except BaseException:
            await self.engine.close(live.session)
            raise
        if command.return_spans:
            reply["spans"] = (
                [{"role": "user", "token_ids": prompt_ids},
                 {"role": "assistant", "token_ids": header_ids}] if prompt_ids is not None
                else [{"role": command.role, "token_ids": command.token_ids}]
                if command.token_ids is not None else [])
        session_id, self._next_id = self._next_id, self._next_id + 1
        self.sessions[session_id] = live
        return {**reply, "session": session_id, "length": live.session.length}

    async def resume(self, command: Command) -> dict[str, Any]:
        """Open a session from its history (spans rescored in order, adjacent spans of one role
        in one step): the same KV, monitor and held-back text as the session it continues."""
        assert command.spans is not None
        total = sum(len(ids) for _, ids in command.spans)
        judge_from = total if command.judge_from is None else command.judge_from
        live = LiveSession(await self.engine.open(),
                           Monitor(policy=command.policy.response_policy(),
                                   policy_start=judge_from), holdback=command.holdback)
        merged: list[tuple[str, list[int]]] = []
        for role, ids in command.spans:
            if merged and merged[-1][0] == role:
                merged[-1][1].extend(ids)
            else:
                merged.append((role, list(ids)))
        try:
            for role, ids in merged:
                live.record(await self.engine.moderate(live.session, ids, role))
        except BaseException:
            await self.engine.close(live.session)
            raise
        if command.held:
            flat = [token for _, ids in merged for token in ids]
            live.held = HeldText(self.token_text(), command.holdback)
            live.held.add(flat[-command.held:], total)
        session_id, self._next_id = self._next_id, self._next_id + 1
        self.sessions[session_id] = live
        return {"type": "opened", "session": session_id, "length": live.session.length,
                "resumed": True, "decision": live.decision(), "held_tokens": command.held}

    def token_text(self) -> TokenText:
        if self._token_text is None:
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: text cannot be released")
            self._token_text = TokenText(self.tokenizer)
        return self._token_text

    def expire(self, idle_s: float, now: float | None = None) -> list[LiveSession]:
        """Take out the sessions idle for more than `idle_s` seconds (the caller closes them:
        `close_sessions`)."""
        now = time.monotonic() if now is None else now
        stale = [key for key, live in self.sessions.items() if now - live.last_used > idle_s]
        return [self.sessions.pop(key) for key in stale]

    async def close_sessions(self, sessions: list[LiveSession]) -> None:
        for live in sessions:
            await self.engine.close(live.session)

    async def feed(self, command: Command) -> dict[str, Any]:
        session_id, live = self._find(command)
        if command.text is None:
            if live.pending_text() or (live.held is not None and live.held.ids):
                raise ProtocolError(
                    "text fed earlier is held back (not yet tokenized or released); end the "
                    "text with a text feed carrying \"final\": true before feeding token_ids")
            assert command.token_ids is not None
            return await self._score(session_id, live, command.token_ids, command.role)
        if live.text is None:
            live.text = text_stream(self.tokenizer)
        if live.held is None:
            live.held = HeldText(self.token_text(), live.holdback)
        saved = live.text.snapshot()
        try:  # a refused step (pool full, bad length, too much text) must not lose the delta
            ids = await asyncio.to_thread(self._push_text, live.text, command.text,
                                          command.final)
            self.limits.check_tokens(len(ids), "the text fed")
            if len(live.pending_text()) > self.limits.max_pending_chars:
                raise TooLargeError(
                    f"{len(live.pending_text())} characters would be held back (an unfinished "
                    f"word or character); the server holds at most "
                    f"{self.limits.max_pending_chars} (max_pending_chars): send \"final\": "
                    f"true or break the text")
            if ids:
                reply = await self._score(session_id, live, ids, command.role)
            else:
                reply = {"type": "verdicts", "session": session_id,
                         **empty_verdicts_json(command.role, live.session.length),
                         "transitions": [], "flags": [], "decision": live.decision(),
                         "length": live.session.length}
        except BaseException:
            live.text.restore(saved)
            raise
        live.held.add(reply["token_ids"], live.session.length)
        released = live.release(command.final)
        return {**reply, "pending_text": live.pending_text(), "released": released,
                "held_tokens": len(live.held.ids)}

    @staticmethod
    def _push_text(text: IncrementalTokenizer, delta: str, final: bool) -> list[int]:
        return text.push(delta) + (text.flush() if final else [])

    async def _score(self, session_id: int, live: LiveSession, ids: list[int],
                     role: str) -> dict[str, Any]:
        verdicts = await self.engine.moderate(live.session, ids, role)
        transitions, flags = live.record(verdicts)
        return {"type": "verdicts", "session": session_id, **verdicts_json(verdicts),
                "transitions": transitions, "flags": flags,
                "decision": live.decision(), "length": live.session.length}

    async def rollback(self, command: Command) -> dict[str, Any]:
        session_id, live = self._find(command)
        assert command.length is not None
        await self.engine.rollback(live.session, command.length)
        dropped = live.pending_text()
        live.rollback(command.length)
        # text held back (never scored) is dropped with the rollback: the reply says which
        return {"type": "rolled_back", "session": session_id, "length": command.length,
                "dropped_text": dropped, "decision": live.decision()}

    async def close(self, command: Command) -> dict[str, Any]:
        session_id, live = self._find(command)
        del self.sessions[session_id]
        await self.engine.close(live.session)
        return {"type": "closed", "session": session_id}

    async def close_all(self) -> None:
        """Free every session of this connection (on disconnect)."""
        sessions, self.sessions = list(self.sessions.values()), {}
        await self.close_sessions(sessions)

    def _find(self, command: Command) -> tuple[int, LiveSession]:
        if command.session is None:
            if len(self.sessions) != 1:
                raise ProtocolError(f"'session' is required: this connection holds "
                                    f"{len(self.sessions)} sessions")
            return next(iter(self.sessions.items()))
        if command.session not in self.sessions:
            raise SessionUnknownError(f"unknown session {command.session}: this connection "
                                      f"holds {sorted(self.sessions)[:16]}")
        live = self.sessions[command.session]
        live.last_used = time.monotonic()
        return command.session, live
