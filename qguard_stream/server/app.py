"""The moderation server: the FastAPI app (WebSocket streaming, one-shot HTTP, health, metrics).
The `serve` subcommand that runs it is qguard_stream.cli.serve.

Routes: WS /v1/stream (see protocol.py), POST /v1/moderate, GET /health, GET /metrics.
Optional bearer-token auth on every route but /health. All model work goes through one AsyncEngine,
so concurrent connections share batched steps.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from qguard_stream.conversation import plan_conversation
from qguard_stream.engine import AsyncEngine, Engine, PoolExhaustedError
from qguard_stream.server.connection import OFF_LOOP_BYTES, Connection
from qguard_stream.server.metrics import ServerMetrics
from qguard_stream.server.protocol import ServerLimits, TooLargeError, load_json
from qguard_stream.stream import StreamGuard
from qguard_stream.verdicts import NonFiniteScoresError

log = logging.getLogger(__name__)

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def is_authorized(headers: Mapping[str, str], api_key: str | None) -> bool:
    """True without a key, else only for `Authorization: Bearer <key>`."""
    if api_key is None:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())


def create_app(engine_or_guard: Engine | StreamGuard, api_key: str | None = None,
               limits: ServerLimits | None = None, open_docs: bool = False) -> FastAPI:
    """The app over an Engine (or a StreamGuard, wrapped in an Engine with default settings);
    `limits` bound every frame and request (ServerLimits' defaults when None). With an
    `api_key`, /docs, /redoc and /openapi.json are served only if `open_docs` (they take no
    key); without one they are served."""
    limits = limits or ServerLimits()
    engine = engine_or_guard if isinstance(engine_or_guard, Engine) else Engine(engine_or_guard)
    runtime = AsyncEngine(engine)
    metrics = ServerMetrics()
    engine.step_listeners.append(metrics.observe_step)
    tokenizer = engine.guard.tokenizer

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await runtime.aclose()

    docs = {} if api_key is None or open_docs else \
        {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="qguard-stream", lifespan=lifespan, **docs)
    app.state.engine, app.state.metrics = engine, metrics

    def unauthorized() -> JSONResponse:
        return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not is_authorized(request.headers, api_key):
            return unauthorized()
        return Response(metrics.render(await runtime.stats()), media_type=PROMETHEUS_TYPE)

    @app.post("/v1/moderate")
    async def moderate(request: Request) -> Response:
        if not is_authorized(request.headers, api_key):
            return unauthorized()
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return JSONResponse({"error": f"Content-Type must be application/json, got "
                                          f"{media_type or 'none'!r}", "code": "bad_request"},
                                status_code=415)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_frame_bytes:
            return JSONResponse({"error": f"body of {declared} bytes exceeds the server's limit "
                                          f"of {limits.max_frame_bytes} (max_frame_bytes)",
                                 "code": "too_large"}, status_code=413)
        try:
            raw = await request.body()
            body = (await asyncio.to_thread(load_json, raw, limits)
                    if len(raw) > OFF_LOOP_BYTES else load_json(raw, limits))
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
        connection = Connection(runtime, tokenizer, limits)
        metrics.connections.inc()
        try:
            await serve_connection(websocket, connection)
        finally:
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
