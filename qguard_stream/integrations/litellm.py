"""Qwen3Guard-Stream as a LiteLLM proxy guardrail: prompts checked before the call, streamed
responses scored token by token while they stream, non-streamed responses checked whole.

In the LiteLLM proxy's config.yaml:

    guardrails:
      - guardrail_name: qwen3guard-stream
        litellm_params:
          guardrail: qguard_stream.integrations.litellm.QGuardStream
          mode: [pre_call, post_call]
          default_on: true
          api_base: ws://guard-host:8000     # a running `qguard-stream serve` (or model: PATH)
          api_key: os.environ/QGUARD_API_KEY # the server's --api-key, if it has one
          holdback: 2                        # tokens scored before their text is released
          policy: official                   # | strict | threshold:P
          unreachable_fallback: fail_closed  # | fail_open

Guarantees. A flagged prompt never reaches the model: the request fails with HTTP 400 naming
the verdict. A streamed response reaches the client only as text whose tokens have `holdback`
scored tokens after them (default 2: with the official rule no token of a flagged run is ever
sent); on a flag the guardrail stops reading the model, sends a last chunk with
finish_reason "content_filter" and the verdict in its `qguard` field, and LiteLLM ends the stream
with `data: [DONE]`. A flagged non-streamed choice keeps only the text before the flagged run,
with finish_reason "content_filter". Each of `n` choices is guarded. If the guard server cannot be
reached or fails, requests fail closed (503 before the call, a content_filter end mid-stream)
unless `unreachable_fallback: fail_open`, which lets them through unguarded (logged); a guard
failing mid-stream then releases the text it held back and passes the rest of the stream as the
model sends it (choices already flagged stay ended).

Both backends speak the guard server's protocol (qguard_stream.client): `api_base` reaches a
server over its WebSocket (one connection per request; the guard usually sits on a GPU box and the
gateway on CPU), `model` runs the guard in the LiteLLM process with the same server code.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

try:
    from fastapi import HTTPException
    from litellm.integrations.custom_guardrail import CustomGuardrail
    from litellm.types.guardrails import GuardrailEventHooks
    from litellm.types.utils import ModelResponseStream
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("qguard_stream.integrations.litellm needs LiteLLM's proxy: "
                      "pip install 'qguard-stream[litellm]'") from error

from qguard_stream.client import AsyncGuardClient, GuardServerError, GuardUnavailableError
from qguard_stream.policy import GuardPolicy
from qguard_stream.proxy.guard import GUARD_FAILURES, ChoiceGuard, Guards, failure_chunk
from qguard_stream.server.protocol import MAX_HOLDBACK
from qguard_stream.template import text_messages

log = logging.getLogger(__name__)
FALLBACKS = ("fail_closed", "fail_open")


class QGuardStream(CustomGuardrail):
    """The guardrail LiteLLM builds from config.yaml (litellm_params become keyword arguments;
    those this class and CustomGuardrail do not take are ignored)."""

    def __init__(self, api_base: str | None = None, api_key: str | None = None,
                 model: str | None = None, holdback: int = 2, policy: str = "official",
                 unreachable_fallback: str = "fail_closed", timeout: float | None = None,
                 device: str | None = None, **kwargs: Any) -> None:
        if (api_base is None) == (model is None):
            raise ValueError("QGuardStream needs exactly one of api_base (a running "
                             "`qguard-stream serve`, ws://HOST:PORT) and model (a checkpoint "
                             f"path or Hub id, run in-process); got api_base={api_base!r}, "
                             f"model={model!r}")
        if isinstance(holdback, bool) or not isinstance(holdback, int) or \
                not 0 <= holdback <= MAX_HOLDBACK:
            raise ValueError(f"holdback must be an int in [0, {MAX_HOLDBACK}], got {holdback!r}")
        if unreachable_fallback not in FALLBACKS:
            raise ValueError(f"unreachable_fallback must be one of {FALLBACKS}, got "
                             f"{unreachable_fallback!r}")
        self.policy = GuardPolicy.parse(policy)
        self.api_base, self.api_key, self.model, self.device = api_base, api_key, model, device
        self.holdback, self.fail_open = holdback, unreachable_fallback == "fail_open"
        self.request_timeout = 30.0 if timeout is None else float(timeout)
        self._runtime: Any = None  # the in-process engine, loaded on first use
        self._tokenizer: Any = None
        self._loading = asyncio.Lock()
        accepted = inspect.signature(CustomGuardrail.__init__).parameters
        kwargs.setdefault("supported_event_hooks",
                          [GuardrailEventHooks.pre_call, GuardrailEventHooks.post_call])
        super().__init__(timeout=timeout,
                         **{key: value for key, value in kwargs.items() if key in accepted})

    # ---- the guard server ----------------------------------------------------------------
    async def connect(self) -> AsyncGuardClient:
        """A client for one request: a new WebSocket, or an in-process server connection."""
        if self.api_base is not None:
            return await AsyncGuardClient.connect(self.api_base, self.api_key,
                                                  self.request_timeout)
        async with self._loading:
            if self._runtime is None:
                try:
                    self._runtime, self._tokenizer = await asyncio.to_thread(self._load)
                except Exception as error:
                    raise GuardUnavailableError(f"cannot load the guard {self.model!r}: "
                                                f"{type(error).__name__}: {error}") from error
        return AsyncGuardClient.in_process(self._runtime, self._tokenizer)

    def _load(self) -> tuple[Any, Any]:
        from qguard_stream.engine import AsyncEngine, Engine
        from qguard_stream.stream import StreamGuard

        guard = StreamGuard.from_pretrained(self.model, device=self.device)
        return AsyncEngine(Engine(guard)), guard.tokenizer

    async def open_choice(self, client: AsyncGuardClient,
                          messages: list[dict[str, str]]) -> tuple[ChoiceGuard, dict[str, Any]]:
        return await ChoiceGuard.open(client, messages, self.policy, self.holdback)

    def unavailable(self, error: BaseException) -> HTTPException:
        log.error("qguard-stream guardrail failed closed: %s", error)
        return HTTPException(status_code=503, detail={
            "error": f"the guard is unavailable ({type(error).__name__}: {error}); failing "
                     f"closed", "qguard": {"error": str(error)}})

    # ---- LiteLLM hooks -------------------------------------------------------------------
    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict,
                                  call_type: Any) -> dict | None:
        """Score the prompt (the last user turn, query heads); a flag refuses the request."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.pre_call) \
                is not True or "messages" not in data:
            return data
        messages = _messages(data)
        try:
            async with await self.connect() as client:
                _, prompt = await self.open_choice(client, messages)
        except GUARD_FAILURES as error:
            if _is_bad_request(error):
                raise HTTPException(status_code=400, detail={"error": str(error)}) from error
            if self.fail_open:
                log.warning("qguard-stream guardrail unavailable, failing open: %s", error)
                return data
            raise self.unavailable(error) from error
        if prompt["flagged"]:
            verdict = {"stage": "prompt", **{key: prompt[key] for key in
                                             ("risk_level", "category", "position")}}
            raise HTTPException(status_code=400, detail={
                "error": f"the prompt was flagged {prompt['risk_level']} ({prompt['category']}) "
                         f"by Qwen3Guard-Stream", "qguard": verdict})
        return data

    async def async_post_call_success_hook(self, data: dict, user_api_key_dict: Any,
                                           response: Any) -> Any:
        """Check a non-streamed completion whole; a flagged choice is cut before the flagged
        run and ends with finish_reason content_filter."""
        if self.should_run_guardrail(data=data, event_type=GuardrailEventHooks.post_call) \
                is not True or not hasattr(response, "choices") or "messages" not in data:
            return response
        messages = _messages(data)
        completion = response.model_dump()
        try:
            async with await self.connect() as client:
                guards = Guards(lambda: self._next_choice(client, messages),
                                fail_open=self.fail_open)
                try:
                    await guards.check_completion(completion)
                finally:
                    await guards.close()
        except GUARD_FAILURES as error:
            if self.fail_open:
                log.warning("qguard-stream guardrail unavailable, failing open: %s", error)
                return response
            raise self.unavailable(error) from error
        for choice, checked in zip(response.choices, completion.get("choices") or []):
            if "qguard" in checked:
                choice.message.content = checked["message"]["content"]
                choice.finish_reason = "content_filter"
                choice.qguard = checked["qguard"]
        if "qguard" in completion:
            response.qguard = completion["qguard"]
        return response

    async def async_post_call_streaming_iterator_hook(
            self, user_api_key_dict: Any, response: AsyncIterator[Any],
            request_data: dict) -> AsyncGenerator[Any, None]:
        """Stream the response with each choice's text released as its guard allows; on a flag,
        a last content_filter chunk, and the model is no longer read."""
        if self.should_run_guardrail(data=request_data,
                                     event_type=GuardrailEventHooks.post_call) is not True \
                or "messages" not in request_data:
            async for chunk in response:
                yield chunk
            return
        messages = _messages(request_data)
        try:
            client = await self.connect()
        except GuardUnavailableError as error:
            if self.fail_open:
                log.warning("qguard-stream guardrail unavailable, failing open: %s", error)
                async for chunk in response:
                    yield chunk
                return
            yield _stream_chunk(failure_chunk(error, []), None)
            await _close(response)
            return
        guards = Guards(lambda: self._next_choice(client, messages), fail_open=self.fail_open)
        last = None
        try:
            async for chunk in response:
                last = chunk
                data = chunk.model_dump(exclude_none=True)
                out = await guards.chunk(data)
                if out is data:
                    yield chunk
                elif out is not None:
                    yield _stream_chunk(out, chunk)
                if guards.all_flagged:
                    break  # every choice was flagged: stop reading the model
            for tail in await guards.tails():
                yield _stream_chunk(tail, last)
        except GUARD_FAILURES as error:  # failing closed (Guards fails open, if told to)
            log.error("qguard-stream guardrail failed mid-stream: %s", error)
            yield _stream_chunk(guards.failure(error), last)
        finally:
            await _close(response)
            try:
                await guards.close()
            except GUARD_FAILURES:
                pass
            await client.aclose()

    async def _next_choice(self, client: AsyncGuardClient,
                           messages: list[dict[str, str]]) -> ChoiceGuard:
        choice, _ = await self.open_choice(client, messages)
        return choice


def _messages(data: dict) -> list[dict[str, str]]:
    try:
        return text_messages(data.get("messages"))
    except ValueError as error:
        raise HTTPException(status_code=400, detail={"error": str(error)}) from error


def _is_bad_request(error: BaseException) -> bool:
    return isinstance(error, GuardServerError) and error.code in ("bad_request", "too_large")


def _stream_chunk(out: dict[str, Any], like: Any) -> ModelResponseStream:
    """A LiteLLM stream chunk from a chunk dict, with the id, model and created of `like`."""
    for key in ("id", "created", "model", "system_fingerprint"):
        if like is not None and getattr(like, key, None) is not None:
            out.setdefault(key, getattr(like, key))
    if "qguard" in out:  # LiteLLM's fast serializer keeps extra fields only on chunks that
        # carry provider_specific_fields: there too, the verdict is a provider's finding
        out["provider_specific_fields"] = {"qguard": out["qguard"]}
    chunk = ModelResponseStream(**out)
    hidden = getattr(like, "_hidden_params", None)
    if hidden:
        chunk._hidden_params = hidden
    return chunk


async def _close(response: Any) -> None:
    close = getattr(response, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # the stream is being abandoned; nothing to keep
            log.debug("closing the model's stream failed", exc_info=True)
