"""Guarding OpenAI chat completions: a prompt check, and one guarded response per choice.

Shared by the guard proxy (app.py) and the LiteLLM guardrail, both talking to the guard server's
protocol through an AsyncGuardClient (a `qguard-stream serve` WebSocket, or the same server code in
this process). A choice's response arrives as text deltas; its `ChoiceGuard` session re-tokenizes
them incrementally on the server (the ids equal the tokenization of the whole text), scores the
ids that became final, lets the policy judge them, and releases text only for tokens followed by
`holdback` scored tokens, so with the official rule and holdback 2 no token of a flagged run is
ever released. `Guards` holds one request's choice guards and rewrites OpenAI chunk and
completion dicts, failing closed (raising) or open on a guard failure. Nothing here knows HTTP or
SSE.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from qguard_stream.client import AsyncGuardClient, GuardServerError, GuardUnavailableError
from qguard_stream.policy import GuardPolicy

log = logging.getLogger(__name__)
GUARD_FAILURES = (GuardUnavailableError, GuardServerError)  # the guard, not the upstream, failed


class ChoiceGuard:
    """One choice's guarded response, on a guard server's session (`qguard-stream serve` over its
    WebSocket, or the same server code in this process: an AsyncGuardClient either way). The
    server re-tokenizes the deltas, judges with the session's policy and releases text with the
    session's holdback; `flag` is the stop decision once made ({"risk_level", "category",
    "position"}; position: the flagged token's index in the response, 0 for its first token,
    counted in the guard's tokens), after which nothing more is released."""

    def __init__(self, client: AsyncGuardClient, session: int, start: int) -> None:
        self.client, self.session = client, session
        self.start = start  # the session's length before the response: prompt and header
        self.tokens_scored = 0
        self._flag: dict[str, Any] | None = None
        self.closed = False

    @classmethod
    async def open(cls, client: AsyncGuardClient, messages: list[dict[str, str]],
                   policy: GuardPolicy, holdback: int) -> tuple[ChoiceGuard, dict[str, Any]]:
        """A session holding the prompt (scored) and the assistant header; and the prompt's
        verdict ({"risk_level", "category", "position", "flagged", ...})."""
        reply = await client.open(messages=messages, policy=policy.name, holdback=holdback)
        return cls(client, reply["session"], reply["length"]), reply["prompt"]

    @property
    def flag(self) -> dict[str, Any] | None:
        return self._flag

    async def push(self, delta: str) -> str:
        return await self._feed(delta, final=False)

    async def finish(self) -> str:
        return await self._feed("", final=True)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.client.close_session(self.session)

    async def _feed(self, text: str, final: bool) -> str:
        if self._flag is not None:
            return ""
        reply = await self.client.feed(self.session, text=text, final=final)
        self.tokens_scored += len(reply["token_ids"])
        stop = next((flag for flag in reply["flags"] if flag["stop"]), None)
        if stop is not None:
            self._flag = {"risk_level": stop["risk_level"], "category": stop["category"],
                          "position": stop["position"] - self.start}
        return reply["released"]


class Guards:
    """The choice guards of one request, by choice index. The first choice continues the
    prompt's session (`first`); `open_choice` opens one for each further choice (the prompt
    scored again). `on_flag` sees each flag as it is made.

    A guard failure (GUARD_FAILURES) raises, unless `fail_open`: then it is logged, the text each
    unended choice holds back is released, and from then on the upstream's chunks pass through
    unguarded (`failed_open` is the failure; choices that ended, flagged ones too, stay ended)."""

    def __init__(self, open_choice: Callable[[], Awaitable[ChoiceGuard]],
                 first: ChoiceGuard | None = None,
                 on_flag: Callable[[dict[str, Any]], None] | None = None,
                 fail_open: bool = False) -> None:
        self.open_choice, self.first, self.on_flag = open_choice, first, on_flag
        self.fail_open = fail_open
        self.by_choice: dict[int, ChoiceGuard] = {}
        self.done: set[int] = set()
        self.text_in: dict[int, str] = {}  # each choice's text as the upstream sent it
        self.text_out: dict[int, str] = {}  # each choice's text as sent on
        self.failed_open: BaseException | None = None

    async def get(self, index: int) -> ChoiceGuard:
        guard = self.by_choice.get(index)
        if guard is None:
            if self.first is not None:
                guard, self.first = self.first, None
            else:
                guard = await self.open_choice()
            self.by_choice[index] = guard
        return guard

    @property
    def all_flagged(self) -> bool:
        """Every choice seen has ended flagged: nothing more is worth reading upstream."""
        return bool(self.by_choice) and len(self.done) == len(self.by_choice) and all(
            guard.flag is not None for guard in self.by_choice.values())

    @property
    def tokens_scored(self) -> int:
        return sum(guard.tokens_scored for guard in self.by_choice.values())

    def flag(self, guard: ChoiceGuard) -> dict[str, Any]:
        flag = guard.flag
        assert flag is not None
        verdict = {"stage": "response", **flag}
        if self.on_flag is not None:
            self.on_flag(verdict)
        return verdict

    def fail(self, error: BaseException) -> None:
        """The guard failed and `fail_open`: everything from here on passes unguarded."""
        if not self.fail_open:
            raise error
        log.warning("the guard failed mid-response; failing open, the rest passes unguarded: "
                    "%s: %s", type(error).__name__, error)
        self.failed_open = error

    async def check_completion(self, data: dict[str, Any]) -> None:
        """Guard a non-streamed completion (a dict) in place: a flagged choice's content keeps
        only the text before the flagged run, its finish_reason becomes content_filter and the
        verdict is in its `qguard` field (and the completion's, for the first flagged). After a
        guard failure with `fail_open`, the remaining choices stay as they are."""
        for choice in data.get("choices") or []:
            message = choice.get("message") or {}
            content = message.get("content")
            if not isinstance(content, str) or not content:
                continue
            try:
                guard = await self.get(int(choice.get("index", 0)))
                released = await guard.push(content) + await guard.finish()
            except GUARD_FAILURES as error:
                self.fail(error)
                return
            if guard.flag is not None:
                message["content"] = released
                choice["finish_reason"] = "content_filter"
                choice["qguard"] = self.flag(guard)
                data.setdefault("qguard", choice["qguard"])

    async def chunk(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """One streamed chunk (a dict) with each choice's delta replaced by the text its guard
        releases; None when nothing is left to send."""
        choices = chunk.get("choices")
        if not choices:  # e.g. the usage chunk of stream_options.include_usage: passed as is
            return chunk
        if self.failed_open is not None:
            return self.passed(chunk)
        for choice in choices:
            index, content = int(choice.get("index", 0)), (choice.get("delta") or {}).get("content")
            if index not in self.done and isinstance(content, str):
                self.text_in[index] = self.text_in.get(index, "") + content
        out_choices: list[dict[str, Any]] = []
        try:
            for choice in choices:
                entry = await self.guard_choice(choice)
                if entry is not None:
                    out_choices.append(self.sent(entry))
        except GUARD_FAILURES as error:
            self.fail(error)
            self.release_held(choices, out_choices)
        if not out_choices:
            return None
        out = {**chunk, "choices": out_choices}
        flagged = next((c["qguard"] for c in out_choices if "qguard" in c), None)
        if flagged is not None:
            out["qguard"] = flagged
        return out

    async def guard_choice(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        """One choice of a chunk with its delta's text replaced by what its guard releases
        (its end, with the verdict, once flagged); None when it has nothing to send."""
        index = int(choice.get("index", 0))
        if index in self.done:
            return None
        guard = await self.get(index)
        delta = dict(choice.get("delta") or {})
        content = delta.get("content")
        released = await guard.push(content) if isinstance(content, str) and content else ""
        finish = choice.get("finish_reason")
        if guard.flag is None and finish is not None:
            released += await guard.finish()
        if guard.flag is not None or finish is not None:
            self.done.add(index)
        if guard.flag is not None:
            return self.end_choice(index, released, guard)
        if "content" in delta or released:
            delta["content"] = released
        if not delta and finish is None:
            return None
        return {**choice, "delta": delta}

    def sent(self, entry: dict[str, Any]) -> dict[str, Any]:
        index = int(entry.get("index", 0))
        self.text_out[index] = self.text_out.get(index, "") + entry["delta"].get("content", "")
        return entry

    def held(self, index: int) -> str:
        """The text of a choice received from the upstream and not sent on yet."""
        return self.text_in.get(index, "")[len(self.text_out.get(index, "")):]

    def release_held(self, choices: list[dict[str, Any]],
                     out_choices: list[dict[str, Any]]) -> None:
        """After a failure (fail open) on the chunk of `choices`, of which `out_choices` were
        guarded: add every unended choice's held text, with the rest of its upstream entry if it
        was not guarded."""
        guarded = {int(entry.get("index", 0)): entry for entry in out_choices}
        pending = {int(choice.get("index", 0)): choice for choice in choices}
        for index in sorted(set(self.text_in) | set(pending)):
            if index in self.done:
                continue
            held = self.held(index)
            entry = guarded.get(index)
            if entry is not None:
                entry["delta"]["content"] = entry["delta"].get("content", "") + held
                self.text_out[index] += held
                continue
            choice = pending.get(index, {"index": index, "finish_reason": None})
            delta = dict(choice.get("delta") or {})
            if held or "content" in delta:
                delta["content"] = held
            if choice.get("finish_reason") is not None:
                self.done.add(index)
            elif not delta:
                continue
            out_choices.append(self.sent({**choice, "delta": delta}))

    def passed(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """An upstream chunk passed unguarded (after a failure, fail open), less the choices
        that had ended."""
        kept = [c for c in chunk["choices"] if int(c.get("index", 0)) not in self.done]
        if len(kept) == len(chunk["choices"]):
            return chunk
        return {**chunk, "choices": kept} if kept else None

    async def tails(self) -> list[dict[str, Any]]:
        """The upstream ended without finishing some choices: their last chunks (the held-back
        text released, or their flag). Nothing once unguarded: the upstream's ending stands."""
        if self.failed_open is not None:
            return []
        out = []
        for index, guard in sorted(self.by_choice.items()):
            if index in self.done:
                continue
            tail = await self.finish_or_held(index, guard)
            self.done.add(index)
            if guard.flag is not None:
                choice = self.end_choice(index, tail, guard)
            else:
                choice = {"index": index, "delta": {"content": tail}, "finish_reason": "stop"}
            chunk: dict[str, Any] = {"object": "chat.completion.chunk",
                                     "choices": [self.sent(choice)]}
            if "qguard" in choice:
                chunk["qguard"] = choice["qguard"]
            out.append(chunk)
        return out

    async def finish_or_held(self, index: int, guard: ChoiceGuard) -> str:
        """The rest of a choice's text: from its guard, or held as is once unguarded."""
        if self.failed_open is None:
            try:
                return await guard.finish()
            except GUARD_FAILURES as error:
                self.fail(error)
        return self.held(index)

    def failure(self, error: BaseException) -> dict[str, Any]:
        """The last chunk when the guard or the upstream failed mid-stream (failure_chunk over
        the choices seen)."""
        return failure_chunk(error, sorted(self.by_choice))

    def end_choice(self, index: int, released: str, guard: ChoiceGuard) -> dict[str, Any]:
        return {"index": index, "delta": {"content": released} if released else {},
                "finish_reason": "content_filter", "qguard": self.flag(guard)}

    async def close(self) -> None:
        """Close every choice's session (idempotent)."""
        guards = list(self.by_choice.values())
        if self.first is not None:
            guards.append(self.first)
        self.by_choice, self.first = {}, None
        for guard in guards:
            await guard.close()


def failure_chunk(error: BaseException, indices: list[int]) -> dict[str, Any]:
    """The last chunk of a stream the guard could not guard: every choice in `indices` (choice 0
    when none was seen) ends with content_filter, the error named in `qguard`."""
    return {"object": "chat.completion.chunk", "choices": [
        {"index": index, "delta": {}, "finish_reason": "content_filter"}
        for index in indices or [0]],
        "qguard": {"stage": "response", "error": f"{type(error).__name__}: {error}"}}
