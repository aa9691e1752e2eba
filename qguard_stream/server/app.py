"""The moderation server: the FastAPI app (WebSocket streaming, one-shot HTTP, health, metrics).
The `serve` subcommand that runs it is qguard_stream.cli.serve.

Routes: WS /v1/stream (see protocol.py), POST /v1/moderate, GET /health, GET /metrics.
Optional bearer-token auth on every route but /health. All model work goes through one AsyncEngine,
so concurrent connections share batched steps.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from qguard_stream.conversation import plan_conversation
from qguard_stream.engine import AsyncEngine, Engine, PoolExhaustedError
from qguard_stream.server.connection import Connection
from qguard_stream.server.metrics import ServerMetrics
from qguard_stream.stream import StreamGuard

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def is_authorized(headers: Mapping[str, str], api_key: str | None) -> bool:
    """True without a key, else only for `Authorization: Bearer <key>`."""
    if api_key is None:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())


def create_app(engine_or_guard: Engine | StreamGuard, api_key: str | None = None) -> FastAPI:
    """The app over an Engine (or a StreamGuard, wrapped in an Engine with default settings)."""
    engine = engine_or_guard if isinstance(engine_or_guard, Engine) else Engine(engine_or_guard)
    runtime = AsyncEngine(engine)
    metrics = ServerMetrics()
    engine.step_listeners.append(metrics.observe_step)
    tokenizer = engine.guard.tokenizer

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await runtime.aclose()

    app = FastAPI(title="qguard-stream", lifespan=lifespan)
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
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not valid JSON"}, status_code=400)
        try:
            return JSONResponse(await moderate_body(runtime, tokenizer, body))
        except PoolExhaustedError as error:
            return JSONResponse({"error": str(error)}, status_code=503)
        except (ValueError, TypeError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket) -> None:
        if not is_authorized(websocket.headers, api_key):
            await websocket.close(code=1008, reason="missing or wrong bearer token")
            return
        await websocket.accept()
        connection = Connection(runtime, tokenizer)
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


async def moderate_body(runtime: AsyncEngine, tokenizer: Any, body: Any) -> dict[str, Any]:
    """One-shot moderation of {"messages": [...], "thinking": false}: the conversation's JSON
    (ConversationVerdict.to_json, as `qguard-stream moderate` prints it). Raises ValueError /
    TypeError for a bad body."""
    if not isinstance(body, dict) or "messages" not in body:
        raise ValueError('body must be a JSON object with "messages": [{"role", "content"}, ...]')
    thinking = body.get("thinking", False)
    if not isinstance(thinking, bool):
        raise TypeError(f"'thinking' must be a boolean, got {thinking!r}")
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; use the WebSocket API with token_ids")
    plan = plan_conversation(tokenizer, body["messages"], thinking)
    session = await runtime.open()
    try:
        prompt = await runtime.moderate(session, plan.prompt_ids, "user")
        rest = plan.rest_ids
        after = await runtime.moderate(session, rest, "assistant") if rest is not None else None
    finally:
        await runtime.close(session)
    return plan.verdict(prompt, after).to_json()
