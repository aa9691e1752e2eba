"""OpenAI-compatible chat completions: Qwen3Guard-Gen served as the model card deploys it (`vllm
serve Qwen/Qwen3Guard-Gen-8B`), so the card's `openai` client code runs against us unchanged.

`create_gen_app(gen)`: POST /v1/chat/completions (stream and non-stream), GET /v1/models, /health,
/metrics. The content is the text the model generated (special tokens skipped), and our parse of
it rides along in an extra field, `qguard: {safety, categories, refusal, parsed}`, that standard
clients ignore. Decoding is greedy unless `temperature` > 0 (a guard's verdict should repeat);
`top_p`, `seed`, `max_tokens` (or `max_completion_tokens`), `stop` and `n` are honoured as OpenAI
defines them, unknown fields are ignored (as vLLM does), bad values and bodies over the limits
get a 400 in OpenAI's error shape. Concurrent requests share the decoder's running batch
(gen/decode.py: a request joins between steps, a finished one leaves).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qguard_stream.gen.decode import GenRequest, Sampling
from qguard_stream.gen.guard import GenGuard
from qguard_stream.gen.parse import parse_gen_output
from qguard_stream.server.metrics import add_health_and_metrics
from qguard_stream.server.protocol import ServerLimits, TooLargeError, is_authorized, load_json
from qguard_stream.template import text_messages

DEFAULT_MAX_TOKENS = 512
MAX_CHOICES = 8
MAX_STOP_SEQUENCES = 4
RATE_WINDOW_STEPS = 32  # decoding steps the tokens-per-second gauge averages over


def openai_error(message: str, status: int, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status)


class BadParameter(ValueError):
    """A request field OpenAI's API would refuse; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    """The fields of a chat completion request that decoding honours."""

    messages: list[dict[str, str]]
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]
    n: int
    stream: bool
    include_usage: bool

    @classmethod
    def parse(cls, body: Any) -> ChatRequest:
        """Validate a request body (BadParameter naming the field); unknown fields ignored."""
        if not isinstance(body, dict):
            raise BadParameter("body", "the body must be a JSON object")
        try:
            messages = text_messages(body.get("messages"))
        except ValueError as error:
            raise BadParameter("messages", str(error)) from None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise BadParameter("max_tokens", f"max_tokens must be an integer >= 1, got "
                                             f"{max_tokens!r}")
        temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0.0:
            raise BadParameter("top_p", "top_p must be in (0, 1], got 0")
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise BadParameter("seed", f"seed must be an integer, got {seed!r}")
        stop = body.get("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not isinstance(stop, (str, list, type(None))) or len(stops) > MAX_STOP_SEQUENCES \
                or not all(isinstance(s, str) and s for s in stops):
            raise BadParameter("stop", f"stop must be a non-empty string or a list of at most "
                                       f"{MAX_STOP_SEQUENCES}, got {stop!r}")
        n = body.get("n", 1)
        if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
            raise BadParameter("n", f"n must be an integer in [1, {MAX_CHOICES}], got {n!r}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadParameter("stream", f"stream must be a boolean, got {stream!r}")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise BadParameter("stream_options", "stream_options must be an object")
        return cls(messages, max_tokens, Sampling(temperature, top_p, seed), stops, n, stream,
                   options.get("include_usage") is True)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise BadParameter(key, f"{key} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


class GenMetrics:
    """The Gen app's Prometheus metrics: steps are observed on the decoder's thread, queue times
    when a request finishes."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qguard_gen_requests", "Chat completion requests by outcome",
                                ["outcome"], registry=r)
        self.tokens = Counter("qguard_gen_generated_tokens",
                              "Tokens generated, counted at each step", registry=r)
        self.fed = Counter("qguard_gen_processed_tokens", "Tokens run through the model: "
                           "prompts prefilled and generated tokens fed back", registry=r)
        self.tokens_per_second = Gauge(
            "qguard_gen_tokens_per_second", f"Tokens generated per second of decoding over the "
            f"last {RATE_WINDOW_STEPS} steps", registry=r)
        self.recent: deque[tuple[int, float]] = deque(maxlen=RATE_WINDOW_STEPS)
        self.batch = Histogram("qguard_gen_batch_sequences", "Sequences per decoding step",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.step = Histogram("qguard_gen_step_seconds", "Decoding step wall time", registry=r,
                              buckets=(.001, .002, .005, .01, .02, .05, .1, .25, 1))
        self.queue = Histogram("qguard_gen_queue_seconds", "Submit to joining the batch",
                               registry=r, buckets=(.001, .005, .01, .05, .1, .5, 1, 5))

    def observe_step(self, sequences: int, tokens: int, seconds: float) -> None:
        """One decoding step of `tokens` fed tokens: each of its sequences gained a token."""
        self.batch.observe(sequences)
        self.step.observe(seconds)
        self.tokens.inc(sequences)
        self.fed.inc(tokens)
        self.recent.append((sequences, seconds))
        spent = sum(step_seconds for _, step_seconds in self.recent)
        if spent > 0:
            self.tokens_per_second.set(sum(count for count, _ in self.recent) / spent)


class Choice:
    """One choice being decoded: the tokens arrive on the decoder's thread and are handed to the
    event loop; text is the ids received decoded (special tokens skipped), cut at a stop string.
    The ids stop at the token that ended the choice (the decoder may add a few more before it
    sees a cancel), so `completion_tokens` does not depend on timing."""

    def __init__(self, index: int, gen: GenGuard, chat: ChatRequest,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.index, self.gen, self.chat, self.loop = index, gen, chat, loop
        self.events: asyncio.Queue[int | None] = asyncio.Queue()
        self.request: GenRequest | None = None
        self.ids: list[int] = []  # the tokens received while the choice ran
        self.text, self.sent = "", 0  # the text so far; how much of it was streamed
        self.finish_reason: str | None = None

    def listen(self, request: GenRequest, token: int | None) -> None:  # decoder thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, token)

    async def next_text(self) -> str | None:
        """Wait for the next token; the text that may now be sent (None once finished)."""
        if self.finish_reason is not None:
            return None
        token = await self.events.get()
        assert self.request is not None
        if token is None:  # ended: by a stop id, the length limit, or cancelled by a stop string
            self.finish_reason = self.finish_reason or (
                "length" if self.request.finish_reason == "length" else "stop")
            return self._release(final=True)
        self.ids.append(token)
        text_ids = [t for t in self.ids if t not in self.request.stop_ids]
        self.text = self.gen.tokenizer.decode(text_ids, skip_special_tokens=True)
        for stop in self.chat.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.request.cancel()  # the stop string ends the choice; its ending is "stop"
                self.finish_reason = "stop"
        if self.finish_reason is not None:
            return self._release(final=True)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # a character split over tokens: wait for the rest
                end = len(self.text.rstrip("\ufffd"))
            if self.chat.stop:  # a stop string may be starting: hold back what could be it
                end = min(end, len(self.text) - max(len(s) for s in self.chat.stop) + 1)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    @property
    def completion_tokens(self) -> int:
        """Tokens up to the one that ended the choice (its stop id, or its stop string's last)."""
        return len(self.ids)

    def verdict(self, kind: str) -> dict[str, Any]:
        """`qguard`: parse_gen_output of the text, as JSON."""
        parsed = parse_gen_output(self.text, kind)
        return {"safety": parsed.safety, "categories": list(parsed.categories),
                "refusal": parsed.refusal, "parsed": parsed.parsed}


def create_gen_app(gen: GenGuard, served_model_name: str = "qwen3guard-gen",
                   api_key: str | None = None, limits: ServerLimits | None = None) -> FastAPI:
    """The OpenAI-compatible app over a GenGuard (its decoder's batch is shared by all
    requests)."""
    limits = limits or ServerLimits()
    metrics = GenMetrics()
    gen.decoder.step_listeners.append(metrics.observe_step)
    room = gen.config.max_position_embeddings

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield

    app = FastAPI(title="qguard-stream (Gen)", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gen, app.state.metrics = gen, metrics

    def unauthorized() -> JSONResponse:
        return openai_error("missing or wrong bearer token", 401, "authentication_error")

    async def render_metrics() -> bytes:
        return generate_latest(metrics.registry)

    add_health_and_metrics(app, lambda headers: is_authorized(headers, api_key), unauthorized,
                           render_metrics)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not is_authorized(request.headers, api_key):
            return unauthorized()
        return JSONResponse({"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": 0,
            "owned_by": "qguard-stream", "max_model_len": room}]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        if not is_authorized(request.headers, api_key):
            return unauthorized()
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_frame_bytes:
            return openai_error(f"body of {declared} bytes exceeds the server's limit of "
                                f"{limits.max_frame_bytes} (max_frame_bytes)", 400,
                                code="request_too_large")
        try:
            body = load_json(await request.body(), limits)
            parsed = ChatRequest.parse(body)
            limits.check_text(sum(len(m["content"]) for m in parsed.messages), "'messages'")
            ids = await asyncio.to_thread(gen.render, parsed.messages)
        except TooLargeError as error:  # OpenAI answers oversized requests 400, not 413
            return openai_error(str(error), 400, code="request_too_large")
        except BadParameter as error:
            return openai_error(str(error), 400, param=error.param)
        except ValueError as error:
            return openai_error(str(error), 400, param="messages")
        if len(ids) >= room:
            return openai_error(f"the templated messages take {len(ids)} tokens; the model's "
                                f"context is {room}", 400, param="messages")
        max_tokens = min(parsed.max_tokens or DEFAULT_MAX_TOKENS, room - len(ids))
        kind = "response" if parsed.messages[-1]["role"] == "assistant" else "prompt"
        loop = asyncio.get_running_loop()
        choices = [Choice(index, gen, parsed, loop) for index in range(parsed.n)]
        try:
            for choice in choices:
                sampling = parsed.sampling
                if sampling.seed is not None and choice.index:  # n seeded choices differ
                    sampling = Sampling(sampling.temperature, sampling.top_p,
                                        sampling.seed + choice.index)
                choice.request = gen.decoder.submit(ids, max_tokens, gen.stop_ids, sampling,
                                                    choice.listen)
        except Exception as error:
            for choice in choices:
                if choice.request is not None:
                    choice.request.cancel()
            metrics.requests.labels("error").inc()
            return openai_error(f"cannot decode this request: {error}", 503, "server_error")
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        envelope = {"id": ident, "created": created, "model": served_model_name}
        if parsed.stream:
            return StreamingResponse(
                stream_chunks(choices, envelope, kind, len(ids), parsed, metrics),
                media_type="text/event-stream")
        try:
            for choice in choices:
                while await choice.next_text() is not None:
                    pass
        finally:
            for choice in choices:
                choice.request.cancel()
        finished(choices, metrics)
        completion_tokens = sum(choice.completion_tokens for choice in choices)
        out = {**envelope, "object": "chat.completion", "choices": [
            {"index": c.index, "message": {"role": "assistant", "content": c.text},
             "logprobs": None, "finish_reason": c.finish_reason, "qguard": c.verdict(kind)}
            for c in choices],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(ids) + completion_tokens},
            "qguard": choices[0].verdict(kind)}
        return JSONResponse(out)

    return app


def finished(choices: list[Choice], metrics: GenMetrics) -> None:
    for choice in choices:
        request = choice.request
        if request is not None and request.started_at is not None:
            metrics.queue.observe(request.started_at - request.submitted_at)
    metrics.requests.labels("completed").inc()


async def stream_chunks(choices: list[Choice], envelope: dict[str, Any], kind: str,
                        prompt_tokens: int, chat: ChatRequest,
                        metrics: GenMetrics) -> AsyncIterator[str]:
    """The chunks of a streamed completion: the role, content deltas as they decode, each
    choice's finish (with its parsed verdict), the usage when asked for, then [DONE]."""
    def chunk(choice: dict[str, Any], **extra: Any) -> str:
        return "data: " + json.dumps({**envelope, "object": "chat.completion.chunk",
                                      "choices": [choice], **extra}) + "\n\n"

    try:
        for choice in choices:
            yield chunk({"index": choice.index, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None})
        pending = {choice.index: asyncio.ensure_future(choice.next_text()) for choice in choices}
        by_index = {choice.index: choice for choice in choices}
        while pending:
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            for index in [i for i, task in pending.items() if task in done]:
                text, choice = pending.pop(index).result(), by_index[index]
                if text:
                    yield chunk({"index": index, "delta": {"content": text}, "logprobs": None,
                                 "finish_reason": None})
                if choice.finish_reason is None:
                    pending[index] = asyncio.ensure_future(choice.next_text())
                else:
                    verdict = choice.verdict(kind)
                    yield chunk({"index": index, "delta": {}, "logprobs": None,
                                 "finish_reason": choice.finish_reason, "qguard": verdict},
                                qguard=verdict)
        finished(choices, metrics)
        if chat.include_usage:
            completion = sum(choice.completion_tokens for choice in choices)
            yield "data: " + json.dumps({**envelope, "object": "chat.completion.chunk",
                                         "choices": [], "usage": {
                                             "prompt_tokens": prompt_tokens,
                                             "completion_tokens": completion,
                                             "total_tokens": prompt_tokens + completion}}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:  # a client that leaves mid-stream frees its sequences
        for choice in choices:
            if choice.request is not None:
                choice.request.cancel()


def moderation_summary(verdict: dict[str, Any]) -> str:
    """One line for a Stream checkpoint's chat completion: the prompt's verdict and the
    response's decision (ConversationVerdict.to_json's "decision")."""
    decision = verdict["decision"]
    prompt = decision["prompt"]
    line = f"Prompt: {prompt['risk_level']} ({prompt['category']})"
    response = decision["response"]
    if response is not None:
        where = "" if response["flag_position"] is None else \
            f", flagged at token {response['flag_position']}"
        category = "" if response["category"] is None else f" ({response['category']})"
        line += f"; Response: {response['risk_level']}{category}{where}"
    return line


def moderation_completion(verdict: dict[str, Any], model: str, stream: bool,
                          prompt_tokens: int) -> Response:
    """A chat completion whose content is the moderation summary and whose `qguard` field is the
    conversation's verdict JSON (a Stream checkpoint answering the Gen endpoint's clients)."""
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    envelope = {"id": ident, "created": created, "model": model}
    content = moderation_summary(verdict)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
             "total_tokens": prompt_tokens}
    if not stream:
        return JSONResponse({**envelope, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
            "finish_reason": "stop"}], "usage": usage, "qguard": verdict})

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
        return "data: " + json.dumps({**envelope, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            **extra}) + "\n\n"

    events = [chunk({"role": "assistant", "content": ""}, None),
              chunk({"content": content}, None), chunk({}, "stop", qguard=verdict),
              "data: [DONE]\n\n"]
    return StreamingResponse(iter(events), media_type="text/event-stream")
