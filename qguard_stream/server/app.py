"""The moderation server: FastAPI app (WebSocket streaming, one-shot HTTP, health, metrics) and the
`serve` subcommand.

Routes: WS /v1/stream (see protocol.py), POST /v1/moderate, GET /health, GET /metrics.
Optional bearer-token auth on every route but /health. All model work goes through one AsyncEngine,
so concurrent connections share batched steps.
"""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from qguard_stream.engine import AsyncEngine, Engine, EngineSettings, PoolExhaustedError
from qguard_stream.server.connection import Connection
from qguard_stream.server.decision import ConsecutiveUnsafeTracker
from qguard_stream.server.metrics import ServerMetrics
from qguard_stream.server.protocol import last_verdict_json, verdicts_json
from qguard_stream.stream import StreamGuard
from qguard_stream.template import conversation_spans

API_KEY_ENV = "QGUARD_STREAM_API_KEY"
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
    """One-shot moderation of {"messages": [...], "thinking": false}: prompt verdict, per-token
    response verdicts and the decision. Raises ValueError/TypeError for a bad body."""
    if not isinstance(body, dict) or "messages" not in body:
        raise ValueError('body must be a JSON object with "messages": [{"role", "content"}, ...]')
    thinking = body.get("thinking", False)
    if not isinstance(thinking, bool):
        raise TypeError(f"'thinking' must be a boolean, got {thinking!r}")
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; use the WebSocket API with token_ids")
    spans = conversation_spans(tokenizer, body["messages"], thinking=thinking)
    ids, user_end = spans.token_ids, spans.user_end
    session = await runtime.open()
    try:
        prompt = await runtime.moderate(session, ids[: user_end + 1], "user")
        response = None
        if spans.response_start is not None:
            after_prompt = await runtime.moderate(session, ids[user_end + 1:], "assistant")
            response = after_prompt.since(spans.response_start)
    finally:
        await runtime.close(session)
    tracker = ConsecutiveUnsafeTracker()
    if response is not None:
        tracker.update(response)
    prompt_json = last_verdict_json(prompt)
    return {
        "prompt": prompt_json,
        "response": verdicts_json(response) if response is not None else None,
        "decision": {
            "prompt": {"risk_level": prompt_json["risk_level"],
                       "category": prompt_json["category"]},
            "response": tracker.decision() if response is not None else None,
        },
    }


# ---- the `serve` subcommand ------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `qguard-stream serve`."""
    parser.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--kv-memory-gb", type=float, default=None, help="KV pool size in GiB")
    budget.add_argument("--max-tokens", type=int, default=None, help="KV pool size in tokens")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--on-pool-exhausted", choices=("error", "wait"), default="error")
    parser.add_argument("--pool-wait-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--log-level", default="info")


def settings_from_args(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(block_size=args.block_size, kv_memory_gb=args.kv_memory_gb,
                          max_tokens=args.max_tokens, max_batch_tokens=args.max_batch_tokens,
                          on_pool_exhausted=args.on_pool_exhausted,
                          pool_wait_timeout_s=args.pool_wait_timeout)


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    import torch
    import uvicorn

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    guard = StreamGuard.from_pretrained(args.model, device=args.device, dtype=dtype)
    app = create_app(Engine(guard, settings_from_args(args)),
                     api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qguard-stream serve", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
