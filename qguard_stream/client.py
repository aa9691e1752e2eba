"""A client of `qguard-stream serve`'s streaming protocol (server/protocol.py): one WebSocket
connection and the sessions on it, or the same protocol answered in this process.

    async with await AsyncGuardClient.connect("ws://guard-host:8000", api_key=KEY) as client:
        opened = await client.open(messages=[{"role": "user", "content": "Hi"}], holdback=2)
        reply = await client.feed(opened["session"], text="Hello", final=True)
        reply["released"], reply["flags"]

Replies are the server's JSON frames as dicts. An error frame raises GuardServerError (its code
and message); a server that cannot be reached, or a connection that breaks or stays silent past
`timeout`, raises GuardUnavailableError. The server frees a connection's sessions when it closes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from qguard_stream.engine import AsyncEngine
    from qguard_stream.server.protocol import ServerLimits

STREAM_PATH = "/v1/stream"


class GuardServerError(RuntimeError):
    """The server answered a frame with an error frame: `code` is one of bad_request, too_large,
    pool_exhausted, model_error, internal."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class GuardUnavailableError(ConnectionError):
    """The guard server could not be reached, or the connection broke or timed out."""


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
    async def connect(cls, url: str, api_key: str | None = None,
                      timeout: float = 30.0) -> AsyncGuardClient:
        """Open a WebSocket to a running `qguard-stream serve` (see stream_url for `url`);
        `timeout` bounds the handshake and each reply."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        target = stream_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
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
        if reply.get("type") == "error":
            raise GuardServerError(reply.get("code", "internal"), reply.get("error", ""))
        return reply

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
