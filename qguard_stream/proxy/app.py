"""The guard proxy: an OpenAI-compatible server in front of any OpenAI-compatible upstream.

POST /v1/chat/completions (stream and non-stream) and GET /v1/models are forwarded to the upstream
with the request body unchanged; upstream errors come back with the upstream's status and body.
Before forwarding, the prompt (the last user turn) is scored with the query heads: a flagged
prompt never reaches the upstream and gets an OpenAI-shaped `content_filter` answer (or a 400,
`prompt_flag="error"`). A streamed response is guarded per choice (guard.Guards): text
reaches the client only after `holdback` later tokens were scored; on a flag the proxy stops
reading the upstream, sends a last chunk with finish_reason "content_filter" and the verdict in
`qguard`, then `data: [DONE]`. Non-streamed choices are checked whole. Every request's sessions
live on one shared engine (batched). If the guard itself fails, the request fails closed (503,
or a `content_filter` end mid-stream) unless `fail_open`: then it is forwarded unguarded (a
guard failing mid-stream: the held-back text is released and the rest passed through, as
guard.Guards does). Also /health and /metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.background import BackgroundTask

from qguard_stream.client import AsyncGuardClient, GuardServerError, GuardUnavailableError
from qguard_stream.engine import AsyncEngine, Engine
from qguard_stream.policy import GuardPolicy
from qguard_stream.proxy.guard import GUARD_FAILURES, ChoiceGuard, Guards
from qguard_stream.server.chat import openai_error
from qguard_stream.server.metrics import add_health_and_metrics
from qguard_stream.server.protocol import (
    MAX_HOLDBACK,
    ServerLimits,
    TooLargeError,
    is_authorized,
    load_json,
)
from qguard_stream.template import text_messages

log = logging.getLogger(__name__)
FORWARDED_HEADERS = ("openai-organization", "openai-project")


class ProxyMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qguard_proxy_requests", "Chat completion requests by outcome",
                                ["outcome"], registry=r)
        self.flags = Counter("qguard_proxy_flags", "Flags by stage and category",
                             ["stage", "category"], registry=r)
        self.tokens = Counter("qguard_proxy_tokens_scored", "Response tokens scored", registry=r)
        self.added = Histogram("qguard_proxy_added_seconds_per_chunk",
                               "Time the guard adds to each upstream chunk", registry=r,
                               buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1))


def create_proxy_app(engine: Engine | None, upstream: str, api_key: str | None = None,
                     upstream_api_key: str | None = None, holdback: int = 2,
                     policy: str = "official", prompt_flag: str = "completion",
                     fail_open: bool = False, limits: ServerLimits | None = None,
                     upstream_timeout_s: float = 600.0, guard_url: str | None = None,
                     guard_api_key: str | None = None) -> FastAPI:
    """The proxy app over `engine` in this process (its guard's tokenizer re-tokenizes the
    upstream's text), or, with `engine=None`, over a guard server at `guard_url` (`qguard-stream
    serve`, or its Ray Serve deployment), one WebSocket per request."""
    default_policy = GuardPolicy.parse(policy)
    if prompt_flag not in ("completion", "error"):
        raise ValueError(f"prompt_flag must be 'completion' or 'error', got {prompt_flag!r}")
    if isinstance(holdback, bool) or not isinstance(holdback, int) or \
            not 0 <= holdback <= MAX_HOLDBACK:
        raise ValueError(f"holdback must be an int in [0, {MAX_HOLDBACK}], got {holdback!r}")
    if (engine is None) == (guard_url is None):
        raise ValueError("the proxy needs exactly one of an engine and a guard_url")
    limits = limits or ServerLimits()
    runtime = None
    if engine is not None:
        if engine.guard.tokenizer is None:
            raise ValueError("the proxy needs the checkpoint's tokenizer (none was found)")
        runtime = AsyncEngine(engine)

    async def connect() -> AsyncGuardClient:
        if runtime is not None:
            return AsyncGuardClient.in_process(runtime, engine.guard.tokenizer, limits)
        assert guard_url is not None
        return await AsyncGuardClient.connect(guard_url, guard_api_key)

    metrics = ProxyMetrics()
    base = upstream.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    client = httpx.AsyncClient(timeout=httpx.Timeout(upstream_timeout_s, connect=10.0))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()
        if runtime is not None:
            await runtime.aclose()

    app = FastAPI(title="qguard-stream proxy", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    def upstream_headers(request: Request) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if upstream_api_key:
            headers["authorization"] = f"Bearer {upstream_api_key}"
        elif api_key is None and "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]  # the client's own key
        for name in FORWARDED_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        return headers

    async def render_metrics() -> bytes:
        return generate_latest(metrics.registry)

    add_health_and_metrics(
        app, lambda headers: is_authorized(headers, api_key),
        lambda: openai_error("missing or wrong bearer token", 401, "authentication_error"),
        render_metrics)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not is_authorized(request.headers, api_key):
            return openai_error("missing or wrong bearer token", 401, "authentication_error")
        reply = await client.get(f"{base}/v1/models", headers=upstream_headers(request))
        return Response(reply.content, status_code=reply.status_code,
                        media_type=reply.headers.get("content-type"))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        if not is_authorized(request.headers, api_key):
            return openai_error("missing or wrong bearer token", 401, "authentication_error")
        raw = await request.body()
        try:
            body = load_json(raw, limits)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            messages = text_messages(body.get("messages"))
            chosen = GuardPolicy.parse(request.headers["x-qguard-policy"]) \
                if "x-qguard-policy" in request.headers else default_policy
        except TooLargeError as error:
            return openai_error(str(error), 413)
        except ValueError as error:
            return openai_error(str(error), 400, param="messages")
        guard = None
        try:
            guard = await connect()
            first, prompt = await ChoiceGuard.open(guard, messages, chosen, holdback)
        except GuardServerError as error:
            if guard is not None:
                await guard.aclose()
            if error.code in ("bad_request", "too_large"):  # e.g. the last turn is not the user's
                return openai_error(error.message, 413 if error.code == "too_large" else 400,
                                    param="messages")
            return await guard_failed(error, request, raw)
        except Exception as error:
            if guard is not None:
                await guard.aclose()
            return await guard_failed(error, request, raw)
        headers = {"x-qguard-prompt-risk": prompt["risk_level"]}
        if prompt["risk_level"] != "Safe":  # the heads' top category means nothing on Safe
            headers["x-qguard-prompt-category"] = prompt["category"]
        if prompt["flagged"]:
            await guard.aclose()
            metrics.requests.labels("prompt_flagged").inc()
            metrics.flags.labels("prompt", prompt["category"]).inc()
            return prompt_refusal(body, prompt, headers)

        async def open_choice() -> ChoiceGuard:
            choice, _ = await ChoiceGuard.open(guard, messages, chosen, holdback)
            return choice

        def on_flag(verdict: dict[str, Any]) -> None:
            metrics.flags.labels("response", verdict["category"]).inc()

        guards = Guards(open_choice, first, on_flag, fail_open)
        try:
            reply = await client.send(client.build_request(
                "POST", f"{base}/v1/chat/completions", content=raw,
                headers=upstream_headers(request)), stream=True)
        except BaseException as error:
            await close_guards(guards, guard)
            if isinstance(error, httpx.HTTPError):
                return openai_error(f"upstream unreachable: {error}", 502, "upstream_error")
            raise
        if reply.status_code != 200:  # passed back as the upstream sent it
            content = await reply.aread()
            await reply.aclose()
            await close_guards(guards, guard)
            metrics.requests.labels("upstream_error").inc()
            return Response(content, status_code=reply.status_code,
                            media_type=reply.headers.get("content-type"))
        if body.get("stream") is True:  # cleanup also as a background task: it runs even when
            # the client leaves before the stream starts (then the generator never runs)
            return StreamingResponse(guarded_stream(reply, guards, guard, metrics),
                                     headers=headers, media_type="text/event-stream",
                                     background=BackgroundTask(release, reply, guards, guard))
        try:
            data = json.loads(await reply.aread())
            await guards.check_completion(data)
        except GUARD_FAILURES as error:  # fail closed (Guards failed open, if told to)
            metrics.requests.labels("guard_error").inc()
            return unavailable(error)
        finally:
            await reply.aclose()
            metrics.tokens.inc(guards.tokens_scored)
            await close_guards(guards, guard)
        metrics.requests.labels("completed" if guards.failed_open is None
                                else "guard_failed_open").inc()
        return JSONResponse(data, headers=headers)

    def unavailable(error: Exception) -> Response:
        return openai_error(f"the guard is unavailable ({type(error).__name__}: {error}); "
                            f"failing closed", 503, "guard_error")

    async def guard_failed(error: Exception, request: Request, raw: bytes) -> Response:
        """The guard failed before the request went upstream: a 503, or (fail open) the
        upstream's answer as it streams, unguarded."""
        log.exception("the guard failed")
        if not fail_open:
            metrics.requests.labels("guard_error").inc()
            return unavailable(error)
        log.warning("failing open: the request goes upstream unguarded")
        metrics.requests.labels("guard_failed_open").inc()
        try:
            reply = await client.send(client.build_request(
                "POST", f"{base}/v1/chat/completions", content=raw,
                headers=upstream_headers(request)), stream=True)
        except httpx.HTTPError as error:
            return openai_error(f"upstream unreachable: {error}", 502, "upstream_error")
        return StreamingResponse(reply.aiter_bytes(), status_code=reply.status_code,
                                 media_type=reply.headers.get("content-type"),
                                 background=BackgroundTask(reply.aclose))

    def prompt_refusal(body: dict, prompt: dict[str, Any], headers: dict[str, str]) -> Response:
        verdict = {"stage": "prompt", **{key: prompt[key] for key in
                                         ("risk_level", "category", "position")}}
        if prompt_flag == "error":
            return JSONResponse({"error": {
                "message": f"the prompt was flagged {verdict['risk_level']} "
                           f"({verdict['category']}) by Qwen3Guard-Stream",
                "type": "content_filter", "param": "messages", "code": "content_filter"},
                "qguard": verdict}, status_code=400, headers=headers)
        ident, created = f"chatcmpl-qguard-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream") is True:
            chunk = {"id": ident, "object": "chat.completion.chunk", "created": created,
                     "model": body.get("model"), "choices": [{
                         "index": 0, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": "content_filter"}], "qguard": verdict}
            events = [f"data: {json.dumps(chunk)}\n\n", "data: [DONE]\n\n"]
            return StreamingResponse(iter(events), headers=headers,
                                     media_type="text/event-stream")
        return JSONResponse({
            "id": ident, "object": "chat.completion", "created": created,
            "model": body.get("model"), "choices": [{
                "index": 0, "message": {"role": "assistant", "content": ""},
                "finish_reason": "content_filter"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            "qguard": verdict}, headers=headers)

    return app


async def guarded_stream(reply: httpx.Response, guards: Guards, guard: AsyncGuardClient,
                         metrics: ProxyMetrics) -> AsyncIterator[str]:
    """The upstream's SSE events with each choice's text released as its guard allows."""
    outcome = "completed"
    try:
        async for line in reply.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            began = time.perf_counter()
            out = await guards.chunk(chunk)
            metrics.added.observe(time.perf_counter() - began)
            if out is not None:
                yield f"data: {json.dumps(out)}\n\n"
            if guards.all_flagged:
                outcome = "response_flagged"
                break  # every choice was flagged: stop reading the upstream
        for tail in await guards.tails():  # the upstream ended without finishing these
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as error:  # the guard (failing closed) or the upstream failed mid-stream
        log.exception("guarded stream failed")
        outcome = "guard_error" if isinstance(error, GUARD_FAILURES) else "upstream_error"
        yield f"data: {json.dumps(guards.failure(error))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        metrics.tokens.inc(guards.tokens_scored)
        if outcome == "completed" and any(g.flag is not None for g in guards.by_choice.values()):
            outcome = "response_flagged"
        elif outcome == "completed" and guards.failed_open is not None:
            outcome = "guard_failed_open"
        metrics.requests.labels(outcome).inc()
        cleanup = asyncio.ensure_future(release(reply, guards, guard))
        try:  # a client that hangs up cancels us here: the cleanup finishes regardless
            await asyncio.shield(cleanup)
        except asyncio.CancelledError:
            pass


async def release(reply: httpx.Response, guards: Guards, guard: AsyncGuardClient) -> None:
    """Close the upstream response and the request's sessions (idempotent)."""
    await reply.aclose()
    await close_guards(guards, guard)


async def close_guards(guards: Guards, guard: AsyncGuardClient) -> None:
    """Close a request's sessions and its guard connection (idempotent; a guard that is gone
    has freed them already)."""
    try:
        await guards.close()
    except (GuardServerError, GuardUnavailableError):
        pass
    await guard.aclose()
