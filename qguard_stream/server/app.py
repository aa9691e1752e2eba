"""The moderation server: the FastAPI app (WebSocket streaming, one-shot HTTP, health, metrics).
The `serve` subcommand that runs it is qguard_stream.cli.serve.

Routes: WS /v1/stream (see protocol.py), POST /v1/moderate, GET /health, GET /metrics, and the
same sessions over HTTP for clients that cannot hold a WebSocket: POST /v1/sessions (header
x-session-id names the session; the body is an open frame), POST /v1/sessions/{id}/feed and
/rollback, DELETE /v1/sessions/{id}. Every HTTP session reply carries the session's "revision"
(new at each change); a call whose x-session-revision header names another one finds a stale
copy (the session was served elsewhere since, e.g. its key moved to another replica and back):
the copy is closed and the call gets "session_unknown", like a session this replica never held.
Sessions idle longer than `session_ttl_s` are closed (their next frame gets "session_unknown",
and a client holding the history resumes). Optional
bearer-token auth on every route but /health. All model work goes through one AsyncEngine, so
concurrent connections share batched steps. With `replica_id`, every HTTP response carries it in
x-qguard-replica and every "opened" frame in "replica".
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from qguard_stream.conversation import plan_conversation
from qguard_stream.engine import AsyncEngine, Engine, PoolExhaustedError
from qguard_stream.server.chat import moderation_completion, openai_error
from qguard_stream.server.connection import OFF_LOOP_BYTES, Connection
from qguard_stream.server.metrics import ServerMetrics, add_health_and_metrics
from qguard_stream.server.protocol import ServerLimits, TooLargeError, is_authorized, load_json
from qguard_stream.stream import StreamGuard
from qguard_stream.template import text_messages
from qguard_stream.verdicts import NonFiniteScoresError

log = logging.getLogger(__name__)

SESSION_HEADER = "x-session-id"
REVISION_HEADER = "x-session-revision"
SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
ERROR_STATUS = {"bad_request": 400, "session_unknown": 404, "session_exists": 409,
                "too_large": 413, "pool_exhausted": 503, "model_error": 500, "internal": 500}
DEFAULT_SESSION_TTL_S = 600.0


def create_app(engine_or_guard: Engine | StreamGuard, api_key: str | None = None,
               limits: ServerLimits | None = None, open_docs: bool = False,
               session_ttl_s: float | None = DEFAULT_SESSION_TTL_S,
               replica_id: str | None = None,
               served_model_name: str = "qwen3guard-stream") -> FastAPI:
    """The app over an Engine (or a StreamGuard, wrapped in an Engine with default settings);
    `limits` bound every frame and request (ServerLimits' defaults when None). With an
    `api_key`, /docs, /redoc and /openapi.json are served only if `open_docs` (they take no
    key); without one they are served. Sessions idle for `session_ttl_s` seconds are closed
    (None: never)."""
    limits = limits or ServerLimits()
    if session_ttl_s is not None and not session_ttl_s > 0:
        raise ValueError(f"session_ttl_s must be > 0 seconds or None, got {session_ttl_s!r}")
    engine = engine_or_guard if isinstance(engine_or_guard, Engine) else Engine(engine_or_guard)
    runtime = AsyncEngine(engine)
    metrics = ServerMetrics()
    engine.step_listeners.append(metrics.observe_step)
    tokenizer = engine.guard.tokenizer
    connections: set[Connection] = set()  # every live one, for the TTL sweep
    http = Connection(runtime, tokenizer, limits, replica_id)  # the HTTP API's sessions
    connections.add(http)
    http_ids: dict[str, int] = {}  # x-session-id -> session number in `http`
    revisions: dict[str, str] = {}  # x-session-id -> the revision of its last reply

    async def sweep() -> None:
        assert session_ttl_s is not None
        while True:
            await asyncio.sleep(min(session_ttl_s / 4, 10.0))
            try:
                for connection in list(connections):
                    stale = connection.expire(session_ttl_s)
                    if stale:
                        metrics.sessions_expired.inc(len(stale))
                        await connection.close_sessions(stale)
                for key in [k for k, number in http_ids.items() if number not in http.sessions]:
                    del http_ids[key], revisions[key]
            except Exception:  # the sweep must outlive any one failure
                log.exception("session TTL sweep failed")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(sweep()) if session_ttl_s is not None else None
        yield
        if sweeper is not None:
            sweeper.cancel()
        await http.close_all()
        await runtime.aclose()

    docs = {} if api_key is None or open_docs else \
        {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="qguard-stream", lifespan=lifespan, **docs)
    app.state.engine, app.state.metrics = engine, metrics

    def unauthorized() -> JSONResponse:
        return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    if replica_id is not None:
        @app.middleware("http")
        async def name_the_replica(request: Request, call_next: Any) -> Response:
            response = await call_next(request)
            response.headers["x-qguard-replica"] = replica_id
            return response

    def json_error(message: str, code: str) -> JSONResponse:
        return JSONResponse({"error": message, "code": code}, status_code=ERROR_STATUS[code])

    async def read_json(request: Request) -> Any:
        """The body as JSON within the limits; a JSONResponse naming what is wrong instead."""
        if not is_authorized(request.headers, api_key):
            return unauthorized()
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return JSONResponse({"error": f"Content-Type must be application/json, got "
                                          f"{media_type or 'none'!r}", "code": "bad_request"},
                                status_code=415)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_frame_bytes:
            return json_error(f"body of {declared} bytes exceeds the server's limit of "
                              f"{limits.max_frame_bytes} (max_frame_bytes)", "too_large")
        raw = await request.body()
        try:
            return (await asyncio.to_thread(load_json, raw, limits)
                    if len(raw) > OFF_LOOP_BYTES else load_json(raw, limits))
        except TooLargeError as error:
            return json_error(str(error), "too_large")
        except ValueError as error:
            return json_error(str(error), "bad_request")

    async def session_frame(request: Request, kind: str, key: str,
                            body: Any = None) -> Response:
        """Answer one HTTP session call as the WebSocket answers its frame."""
        if not SESSION_ID.fullmatch(key):
            return json_error(f"session id must match {SESSION_ID.pattern}, got {key[:140]!r}",
                              "bad_request")
        if body is None:
            body = {}
        elif not isinstance(body, dict):
            return json_error("body must be a JSON object", "bad_request")
        if kind == "open":
            if key in http_ids:
                return json_error(f"session {key!r} exists on this replica; feed it, or "
                                  f"DELETE it first", "session_exists")
        elif key not in http_ids:
            return json_error(f"unknown session {key!r} on this replica (closed, expired, or "
                              f"opened on another): open it again with its history (spans)",
                              "session_unknown")
        elif request.headers.get(REVISION_HEADER, revisions[key]) != revisions[key]:
            held = await drop_stale(key)
            return json_error(
                f"session {key!r} on this replica is at revision {held!r}, not the client's "
                f"{request.headers[REVISION_HEADER]!r}: it was served elsewhere since (moved "
                f"away and back); this copy is closed: open it again with its history (spans)",
                "session_unknown")
        else:
            body = {**body, "session": http_ids[key]}
        reply = await http.handle_frame(json.dumps({**body, "type": kind}))
        if reply["type"] == "error":
            reply.pop("session", None)
            return JSONResponse(reply, status_code=ERROR_STATUS.get(reply["code"], 500))
        if kind == "close":
            http_ids.pop(key, None)
            revisions.pop(key, None)
            return JSONResponse({**reply, "session": key})
        http_ids[key] = reply["session"]
        revisions[key] = uuid.uuid4().hex
        return JSONResponse({**reply, "session": key, "revision": revisions[key]})

    async def drop_stale(key: str) -> str:
        """Close the stale copy of session `key`; the revision it was at."""
        live = http.sessions.pop(http_ids.pop(key), None)
        if live is not None:
            await http.close_sessions([live])
        return revisions.pop(key)

    @app.post("/v1/sessions")
    async def open_session(request: Request) -> Response:
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        key = request.headers.get(SESSION_HEADER)
        if key is None:
            return json_error(f"the {SESSION_HEADER} header names the session to open",
                              "bad_request")
        return await session_frame(request, "open", key, body)

    @app.post("/v1/sessions/{key}/feed")
    async def feed_session(key: str, request: Request) -> Response:
        body = await read_json(request)
        return body if isinstance(body, Response) else \
            await session_frame(request, "feed", key, body)

    @app.post("/v1/sessions/{key}/rollback")
    async def rollback_session(key: str, request: Request) -> Response:
        body = await read_json(request)
        return body if isinstance(body, Response) else \
            await session_frame(request, "rollback", key, body)

    @app.delete("/v1/sessions/{key}")
    async def close_session(key: str, request: Request) -> Response:
        if not is_authorized(request.headers, api_key):
            return unauthorized()
        return await session_frame(request, "close", key)

    async def render_metrics() -> bytes:
        return metrics.render(await runtime.stats())

    add_health_and_metrics(app, lambda headers: is_authorized(headers, api_key), unauthorized,
                           render_metrics)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not is_authorized(request.headers, api_key):
            return openai_error("missing or wrong bearer token", 401, "authentication_error")
        return JSONResponse({"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": 0,
            "owned_by": "qguard-stream"}]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        """The Gen endpoint's clients against a Stream checkpoint: the conversation moderated,
        a one-line summary as content, the verdict JSON in `qguard`."""
        if not is_authorized(request.headers, api_key):
            return openai_error("missing or wrong bearer token", 401, "authentication_error")
        try:
            body = load_json(await request.body(), limits)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise ValueError(f"stream must be a boolean, got {stream!r}")
            messages = text_messages(body.get("messages"))
            verdict = await moderate_body(runtime, tokenizer, {"messages": messages}, limits)
        except TooLargeError as error:  # OpenAI answers oversized requests 400, as Gen's does
            return openai_error(str(error), 400, code="request_too_large")
        except (ValueError, TypeError) as error:
            return openai_error(str(error), 400, param="messages")
        except PoolExhaustedError as error:
            return openai_error(str(error), 503, "server_error")
        positions = verdict["prompt"]["position"] + 1
        return moderation_completion(verdict, served_model_name, stream, positions)

    @app.post("/v1/moderate")
    async def moderate(request: Request) -> Response:
        body = await read_json(request)
        if isinstance(body, Response):
            return body
        try:
            return JSONResponse(await moderate_body(runtime, tokenizer, body, limits))
        except TooLargeError as error:
            return JSONResponse({"error": str(error), "code": "too_large"}, status_code=413)
        except PoolExhaustedError as error:
            return JSONResponse({"error": str(error), "code": "pool_exhausted"}, status_code=503)
        except NonFiniteScoresError as error:
            return JSONResponse({"error": str(error), "code": "model_error"}, status_code=500)
        except (ValueError, TypeError) as error:
            return JSONResponse({"error": str(error), "code": "bad_request"}, status_code=400)
        except Exception as error:  # named, never a bare 500
            log.exception("POST /v1/moderate failed")
            return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}",
                                 "code": "internal"}, status_code=500)

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        if not is_authorized(websocket.headers, api_key):
            await websocket.close(code=1008, reason="missing or wrong bearer token")
            return
        await websocket.accept()
        connection = Connection(runtime, tokenizer, limits, replica_id)
        connections.add(connection)
        metrics.connections.inc()
        try:
            await serve_connection(websocket, connection)
        finally:
            connections.discard(connection)
            await connection.close_all()
            metrics.connections.dec()

    return app


async def serve_connection(websocket: WebSocket, connection: Connection) -> None:
    """Answer frames until the client goes away (cleanly or not)."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = message.get("text")
            if frame is None:
                frame = message.get("bytes") or b""
            await websocket.send_json(await connection.handle_frame(frame))
    except (WebSocketDisconnect, RuntimeError):
        return  # the client vanished mid-reply; the caller frees its sessions


async def moderate_body(runtime: AsyncEngine, tokenizer: Any, body: Any,
                        limits: ServerLimits) -> dict[str, Any]:
    """One-shot moderation of {"messages": [...], "thinking": false}: the conversation's JSON
    (ConversationVerdict.to_json, as `qguard-stream moderate` prints it). Raises ValueError /
    TypeError for a bad body, TooLargeError past the limits; tokenizes off the event loop."""
    if not isinstance(body, dict) or "messages" not in body:
        raise ValueError('body must be a JSON object with "messages": [{"role", "content"}, ...]')
    thinking = body.get("thinking", False)
    if not isinstance(thinking, bool):
        raise TypeError(f"'thinking' must be a boolean, got {thinking!r}")
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; use the WebSocket API with token_ids")
    messages = body["messages"]
    if isinstance(messages, list):
        limits.check_text(sum(len(m.get("content", "")) for m in messages
                              if isinstance(m, dict) and isinstance(m.get("content"), str)),
                          "'messages'")
    plan = await asyncio.to_thread(plan_conversation, tokenizer, messages, thinking)
    limits.check_tokens(len(plan.prompt_ids) + len(plan.rest_ids or []), "the conversation")
    session = await runtime.open()
    try:
        prompt = await runtime.moderate(session, plan.prompt_ids, "user")
        rest = plan.rest_ids
        after = await runtime.moderate(session, rest, "assistant") if rest is not None else None
    finally:
        await runtime.close(session)
    return plan.verdict(prompt, after).to_json()
