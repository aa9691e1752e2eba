"""Clients of `qguard-stream serve`'s streaming protocol (server/protocol.py).

`AsyncGuardClient` is one WebSocket connection and the sessions on it (or the same protocol
answered in this process):

    async with await AsyncGuardClient.connect("ws://guard-host:8000", api_key=KEY) as client:
        opened = await client.open(messages=[{"role": "user", "content": "Hi"}], holdback=2)
        reply = await client.feed(opened["session"], text="Hello", final=True)
        reply["released"], reply["flags"]

`SessionClient` (sync) and `AsyncSessionClient` give sessions that survive the server: each keeps
its history client-side (the ids scored by role, where judging starts, the text held back), and
when the server answers "session unknown" (its replica died, was scaled down or the session
expired) or the connection breaks, the session is re-opened from that history, on whichever
replica now takes it, and the call is sent again. Verdicts after a resume equal those of the
uninterrupted session. Over "http" each call is one request carrying `x-session-id` (Ray Serve
routes on it) and the session's last revision: a server holding an older copy of the session (its
key moved to another replica and back) answers "session unknown" instead of scoring on stale state.
Over "websocket" a client's sessions share one connection (and live only on it).

Replies are the server's JSON frames as dicts. An error frame raises GuardServerError (its code
and message); a server that cannot be reached, or a connection that breaks or stays silent past
`timeout`, raises GuardUnavailableError. The server frees a connection's sessions when it closes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from qguard_stream.engine import AsyncEngine
    from qguard_stream.server.protocol import ServerLimits

STREAM_PATH = "/v1/stream"
SESSION_HEADER = "x-session-id"
REVISION_HEADER = "x-session-revision"
RESUME_WITHIN_S = 30.0  # how long one call keeps re-opening its session before giving up
T = TypeVar("T")


class GuardServerError(RuntimeError):
    """The server answered a frame with an error frame: `code` is one of bad_request, too_large,
    pool_exhausted, model_error, internal."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class GuardUnavailableError(ConnectionError):
    """The guard server could not be reached, or the connection broke or timed out."""


class SessionLostError(GuardServerError):
    """The server does not hold the session (code "session_unknown"): re-open it from its
    history."""


def _raise_for(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("type") == "error" or ("code" in reply and "error" in reply):
        code, message = reply.get("code", "internal"), reply.get("error", "")
        raise (SessionLostError if code == "session_unknown" else GuardServerError)(code, message)
    return reply


def stream_url(url: str) -> str:
    """ws(s)://host:port/v1/stream from a server URL given as ws(s)://, http(s):// or host:port,
    with or without the path."""
    if "://" not in url:
        url = f"ws://{url}"
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"guard server URL must be ws://, wss://, http:// or https://HOST:PORT, "
                         f"got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(STREAM_PATH):
        path += STREAM_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class AsyncGuardClient:
    """One connection's worth of sessions on a guard server; frames go one at a time."""

    def __init__(self, exchange: Callable[[str], Awaitable[dict[str, Any]]],
                 close: Callable[[], Awaitable[None]]) -> None:
        self._exchange, self._close = exchange, close
        self._lock = asyncio.Lock()
        self.closed = False

    @classmethod
    async def connect(cls, url: str, api_key: str | None = None, timeout: float = 30.0,
                      headers: dict[str, str] | None = None) -> AsyncGuardClient:
        """Open a WebSocket to a running `qguard-stream serve` (see stream_url for `url`);
        `timeout` bounds the handshake and each reply; `headers` go with the handshake."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        target = stream_url(url)
        headers = dict(headers or {})
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        try:
            socket = await connect(target, additional_headers=headers, open_timeout=timeout,
                                   max_size=None)
        except (OSError, TimeoutError, WebSocketException) as error:
            raise GuardUnavailableError(f"cannot reach the guard server at {target}: "
                                        f"{type(error).__name__}: {error}") from error

        async def exchange(frame: str) -> dict[str, Any]:
            try:
                await socket.send(frame)
                return json.loads(await asyncio.wait_for(socket.recv(), timeout))
            except (OSError, TimeoutError, WebSocketException) as error:
                await socket.close()  # a late reply would answer the next frame: start over
                raise GuardUnavailableError(f"the guard server at {target} failed to answer: "
                                            f"{type(error).__name__}: {error}") from error

        return cls(exchange, socket.close)

    @classmethod
    def in_process(cls, engine: AsyncEngine, tokenizer: Any,
                   limits: ServerLimits | None = None) -> AsyncGuardClient:
        """The same protocol answered by a server connection in this process (no socket)."""
        from qguard_stream.server.connection import Connection

        connection = Connection(engine, tokenizer, limits)
        return cls(connection.handle_frame, connection.close_all)

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send one frame, return the server's reply; GuardServerError for an error frame."""
        if self.closed:
            raise GuardUnavailableError("this guard client is closed")
        async with self._lock:
            reply = await self._exchange(json.dumps(frame))
        return _raise_for(reply)

    async def open(self, messages: list[dict[str, str]] | None = None,
                   token_ids: list[int] | None = None, role: str | None = None,
                   policy: str | None = None, holdback: int | None = None) -> dict[str, Any]:
        """Open a session: with chat `messages` (the reply's "prompt" is the prompt verdict),
        with `token_ids` scored as `role`, or empty. `policy` and `holdback`: see the protocol."""
        frame: dict[str, Any] = {"type": "open"}
        for key, value in (("messages", messages), ("token_ids", token_ids), ("role", role),
                           ("policy", policy), ("holdback", holdback)):
            if value is not None:
                frame[key] = value
        return await self.request(frame)

    async def feed(self, session: int, text: str | None = None,
                   token_ids: list[int] | None = None, final: bool = False,
                   role: str = "assistant") -> dict[str, Any]:
        """Score a text delta (re-tokenized on the server) or token ids on a session."""
        frame: dict[str, Any] = {"type": "feed", "session": session, "role": role}
        if text is not None:
            frame.update(text=text, final=final)
        if token_ids is not None:
            frame["token_ids"] = token_ids
        return await self.request(frame)

    async def rollback(self, session: int, length: int) -> dict[str, Any]:
        return await self.request({"type": "rollback", "session": session, "length": length})

    async def close_session(self, session: int) -> dict[str, Any]:
        return await self.request({"type": "close", "session": session})

    async def aclose(self) -> None:
        """Close the connection (the server frees its sessions); idempotent."""
        if not self.closed:
            self.closed = True
            await self._close()

    async def __aenter__(self) -> AsyncGuardClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()


# ---- resumable sessions ------------------------------------------------------------------------
@dataclass
class SessionLog:
    """What a client keeps of a session to re-open it anywhere: the ids scored, by role, in
    order; the first position the policy judges; the session's settings; how many trailing ids'
    text the server still holds back and the text it has not tokenized yet."""

    settings: dict[str, Any] = field(default_factory=dict)  # policy, holdback
    spans: list[tuple[str, list[int]]] = field(default_factory=list)
    judge_from: int = 0
    held: int = 0
    pending_text: str = ""

    @property
    def length(self) -> int:
        return sum(len(ids) for _, ids in self.spans)

    def add(self, role: str, ids: list[int]) -> None:
        if not ids:
            return
        if self.spans and self.spans[-1][0] == role:
            self.spans[-1][1].extend(ids)
        else:
            self.spans.append((role, list(ids)))

    def opened(self, reply: dict[str, Any]) -> None:
        for span in reply.get("spans", []):
            self.add(span["role"], span["token_ids"])
        self.judge_from = reply["length"]

    def fed(self, reply: dict[str, Any]) -> None:
        self.add(reply["role"], reply["token_ids"])
        if "pending_text" in reply:
            self.pending_text, self.held = reply["pending_text"], reply["held_tokens"]

    def rolled_back(self, length: int) -> None:
        self.held = max(0, self.held - (self.length - length))
        self.pending_text = ""
        kept: list[tuple[str, list[int]]] = []
        room = length
        for role, ids in self.spans:
            if room <= 0:
                break
            kept.append((role, ids[:room]))
            room -= len(ids)
        self.spans = kept
        self.judge_from = min(self.judge_from, length)

    def resume_frame(self) -> dict[str, Any]:
        if not self.spans:  # nothing scored yet: an empty open
            return {**self.settings}
        return {**self.settings, "spans": [{"role": role, "token_ids": ids}
                                           for role, ids in self.spans],
                "judge_from": self.judge_from, "held": self.held}


class Transport(Protocol):
    """Where a resumable session's frames go: `open` returns the reply to an open frame for
    session `key`, `send` one for a feed/rollback/close; both raise SessionLostError when the
    server does not hold the session and GuardUnavailableError when it cannot be reached."""

    async def open(self, key: str, frame: dict[str, Any]) -> dict[str, Any]: ...

    async def send(self, key: str, kind: str, frame: dict[str, Any]) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


class WebSocketTransport:
    """A client's sessions on one WebSocket (re-connected when it breaks, sessions resumed)."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        self.url, self.api_key, self.timeout = url, api_key, timeout
        self.client_id = uuid.uuid4().hex  # the routing key of the connection
        self.client: AsyncGuardClient | None = None
        self.numbers: dict[str, int] = {}
        self.lock = asyncio.Lock()

    async def connection(self) -> AsyncGuardClient:
        async with self.lock:
            if self.client is None or self.client.closed:
                self.numbers = {}  # a new connection holds none of the old sessions
                self.client = await AsyncGuardClient.connect(
                    self.url, self.api_key, self.timeout, {SESSION_HEADER: self.client_id})
            return self.client

    async def open(self, key: str, frame: dict[str, Any]) -> dict[str, Any]:
        client = await self.connection()
        try:
            reply = await client.request({**frame, "type": "open"})
        except GuardUnavailableError:
            await client.aclose()
            raise
        self.numbers[key] = reply["session"]
        return reply

    async def send(self, key: str, kind: str, frame: dict[str, Any]) -> dict[str, Any]:
        client = await self.connection()
        if key not in self.numbers:
            raise SessionLostError("session_unknown", f"session {key} is not on this connection")
        try:
            reply = await client.request({**frame, "type": kind, "session": self.numbers[key]})
        except GuardUnavailableError:
            await client.aclose()
            raise
        if kind == "close":
            self.numbers.pop(key, None)
        return reply

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()


class HttpTransport:
    """Each call one HTTP request to the session API, with the session's `x-session-id` and,
    after its open, the revision of its last reply (`x-session-revision`)."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        import httpx

        if "://" not in url:
            url = f"http://{url}"
        parts = urlsplit(url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        self.base = urlunsplit((scheme, parts.netloc, "", "", ""))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(timeout=timeout, headers=headers)
        self.revisions: dict[str, str] = {}  # session key -> the revision of its last reply

    async def call(self, method: str, path: str, key: str, frame: dict[str, Any] | None,
                   revision: str | None = None) -> dict[str, Any]:
        import httpx

        headers = {SESSION_HEADER: key}
        if revision is not None:
            headers[REVISION_HEADER] = revision
        try:
            reply = await self.http.request(method, f"{self.base}{path}", json=frame,
                                            headers=headers)
        except httpx.HTTPError as error:
            raise GuardUnavailableError(f"the guard server at {self.base} failed to answer: "
                                        f"{type(error).__name__}: {error}") from error
        try:
            body = reply.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or ("code" not in body and reply.status_code >= 400):
            if reply.status_code >= 500 or reply.status_code == 404:  # e.g. a gateway's own
                raise GuardUnavailableError(f"the guard server at {self.base} answered "
                                            f"{reply.status_code}: {reply.text[:200]}")
            raise GuardServerError("bad_request", f"HTTP {reply.status_code}: "
                                                  f"{reply.text[:200]}")
        body = _raise_for(body)
        if "revision" in body:
            self.revisions[key] = body["revision"]
        return body

    async def open(self, key: str, frame: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.call("POST", "/v1/sessions", key, frame)
        except GuardServerError as error:
            if error.code != "session_exists":  # a retried open that had landed: start over
                raise
            await self.call("DELETE", f"/v1/sessions/{key}", key, None)
            return await self.call("POST", "/v1/sessions", key, frame)

    async def send(self, key: str, kind: str, frame: dict[str, Any]) -> dict[str, Any]:
        revision = self.revisions.get(key)
        if kind == "close":
            self.revisions.pop(key, None)
            return await self.call("DELETE", f"/v1/sessions/{key}", key, None, revision)
        return await self.call("POST", f"/v1/sessions/{key}/{kind}", key, frame, revision)

    async def aclose(self) -> None:
        await self.http.aclose()


class AsyncSession:
    """A session that re-opens itself from its history when the server loses it."""

    def __init__(self, transport: Transport, key: str, log: SessionLog) -> None:
        self.transport, self.key, self.log = transport, key, log
        self.opened: dict[str, Any] = {}  # the server's reply to the first open
        self.resumes = 0  # how many times it was re-opened
        self.resume_within_s = RESUME_WITHIN_S
        self.closed = False

    @property
    def length(self) -> int:
        """Positions scored so far."""
        return self.log.length

    async def feed(self, text: str | None = None, token_ids: list[int] | None = None,
                   final: bool = False, role: str = "assistant") -> dict[str, Any]:
        """Score a text delta or token ids (see AsyncGuardClient.feed); the server's reply."""
        if (text is None) == (token_ids is None):
            raise ValueError("feed takes exactly one of text and token_ids")

        def frame(resumed: bool) -> dict[str, Any]:
            if token_ids is not None:
                return {"token_ids": list(token_ids), "role": role}
            # a resumed server has none of the text held back untokenized: send it again
            return {"text": (self.log.pending_text if resumed else "") + text, "final": final,
                    "role": role}

        reply = await self._call("feed", frame)
        self.log.fed(reply)
        return reply

    async def rollback(self, length: int) -> dict[str, Any]:
        """Keep the first `length` positions."""
        reply = await self._call("rollback", lambda _: {"length": length})
        self.log.rolled_back(length)
        return reply

    async def close(self) -> None:
        """Free the session on the server (a server that lost it already has)."""
        if self.closed:
            return
        self.closed = True
        try:
            await self.transport.send(self.key, "close", {})
        except (SessionLostError, GuardUnavailableError):
            pass

    async def _call(self, kind: str, frame: Callable[[bool], dict[str, Any]]
                    ) -> dict[str, Any]:
        """Send the call; when the session is lost, re-open it from the log and send again,
        backing off while no server answers, for up to `resume_within_s` seconds."""
        if self.closed:
            raise GuardServerError("bad_request", f"session {self.key} is closed")
        loop = asyncio.get_running_loop()
        deadline, delay, resumed = loop.time() + self.resume_within_s, 0.05, False
        while True:
            try:
                return await self.transport.send(self.key, kind, frame(resumed))
            except (SessionLostError, GuardUnavailableError):
                if loop.time() >= deadline:
                    raise
            while True:  # re-open, on whichever server now takes the session's key
                try:
                    await self.transport.open(self.key, self.log.resume_frame())
                    break
                except GuardUnavailableError:
                    if loop.time() >= deadline:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(1.0, delay * 2)
            self.resumes += 1
            resumed = True


class AsyncSessionClient:
    """Resumable sessions on a guard server (or a Ray Serve deployment of it)."""

    def __init__(self, url: str, api_key: str | None = None, transport: str = "websocket",
                 timeout: float = 30.0) -> None:
        if transport not in ("websocket", "http"):
            raise ValueError(f"transport must be 'websocket' or 'http', got {transport!r}")
        kind = WebSocketTransport if transport == "websocket" else HttpTransport
        self.transport: Transport = kind(url, api_key, timeout)

    async def open(self, messages: list[dict[str, str]] | None = None,
                   token_ids: list[int] | None = None, role: str = "user",
                   policy: str | None = None, holdback: int | None = None) -> AsyncSession:
        """Open a session (see AsyncGuardClient.open); the reply is in `session.opened`."""
        settings = {key: value for key, value in (("policy", policy), ("holdback", holdback))
                    if value is not None}
        frame: dict[str, Any] = {**settings, "return_spans": True}
        if messages is not None:
            frame["messages"] = messages
        if token_ids is not None:
            frame.update(token_ids=list(token_ids), role=role)
        key = uuid.uuid4().hex
        reply = await self.transport.open(key, frame)
        log = SessionLog(settings=settings)
        log.opened(reply)
        session = AsyncSession(self.transport, key, log)
        session.opened = reply
        return session

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> AsyncSessionClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _Loop:
    """A private event loop on a daemon thread, for the sync client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class Session:
    """The sync face of an AsyncSession."""

    def __init__(self, loop: _Loop, session: AsyncSession) -> None:
        self._loop, self._session = loop, session
        self.opened: dict[str, Any] = session.opened

    @property
    def resumes(self) -> int:
        return self._session.resumes

    @property
    def length(self) -> int:
        return self._session.length

    def feed(self, text: str | None = None, token_ids: list[int] | None = None,
             final: bool = False, role: str = "assistant") -> dict[str, Any]:
        return self._loop.run(self._session.feed(text, token_ids, final, role))

    def rollback(self, length: int) -> dict[str, Any]:
        return self._loop.run(self._session.rollback(length))

    def close(self) -> None:
        self._loop.run(self._session.close())


class SessionClient:
    """Resumable sessions, synchronously (an AsyncSessionClient on a private event loop)."""

    def __init__(self, url: str, api_key: str | None = None, transport: str = "websocket",
                 timeout: float = 30.0) -> None:
        self._loop = _Loop()
        self._client = self._loop.run(_make(url, api_key, transport, timeout))

    def open(self, messages: list[dict[str, str]] | None = None,
             token_ids: list[int] | None = None, role: str = "user",
             policy: str | None = None, holdback: int | None = None) -> Session:
        return Session(self._loop, self._loop.run(
            self._client.open(messages, token_ids, role, policy, holdback)))

    def close(self) -> None:
        try:
            self._loop.run(self._client.aclose())
        finally:
            self._loop.stop()

    def __enter__(self) -> SessionClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _make(url: str, api_key: str | None, transport: str,
                timeout: float) -> AsyncSessionClient:
    return AsyncSessionClient(url, api_key, transport, timeout)  # made on its loop
