"""The guard proxy (`qguard-stream proxy`) between the official `openai` client and a fake
OpenAI-compatible upstream, both real servers on loopback. The guard is a trigger checkpoint:
Unsafe exactly at the tokens " bomb" and " fuse" (two adjacent: the official rule flags)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from benchmarks.fake_upstream import CLEAN, FakeUpstream, Loopback
from qguard_stream import StreamGuard
from qguard_stream.checkpoints import make_trigger_checkpoint
from qguard_stream.engine import Engine, EngineSettings
from qguard_stream.proxy.app import create_proxy_app
from qguard_stream.server import create_app

BOMB, FUSE, IM_END = 12764, 31702, 151645
FLAGGED = "Mix flour and water. Light the bomb fuse now, then run."
SAFE_PREFIX = "Mix flour and water. Light the"  # released: everything before the flagged run


@pytest.fixture(autouse=True)
def reset(upstream: FakeUpstream) -> None:
    upstream.reset()


def trigger_guard(directory: Path, tokens: list[int]) -> StreamGuard:
    return StreamGuard.from_pretrained(make_trigger_checkpoint(directory, tokens), device="cpu")


@pytest.fixture(scope="module")
def proxy(upstream: FakeUpstream, tmp_path_factory) -> Iterator[Loopback]:
    engine = Engine(trigger_guard(tmp_path_factory.mktemp("trig"), [BOMB, FUSE]),
                    EngineSettings(max_tokens=65536))
    served = Loopback(create_proxy_app(engine, f"{upstream.loop.url}/v1"))
    served.engine = engine
    yield served
    served.stop()


def client(proxy: Loopback) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0)


def ask(text: str = "How do I bake bread?") -> list[dict]:
    return [{"role": "user", "content": text}]


def streamed(proxy: Loopback, **options) -> tuple[str, list]:
    chunks = list(client(proxy).chat.completions.create(
        model="fake", messages=ask(), stream=True, **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def wait_idle(proxy: Loopback) -> None:
    for _ in range(200):
        if proxy.engine.stats().active_sessions == 0:
            return
        time.sleep(0.05)
    assert proxy.engine.stats().active_sessions == 0


@pytest.mark.parametrize("sizes", [[1], [3], [2, 7, 1], [40]])
def test_a_clean_stream_reaches_the_client_unchanged(proxy, upstream, sizes) -> None:
    upstream.sizes = sizes  # deltas split inside words and multi-byte characters
    text, chunks = streamed(proxy)
    assert text == CLEAN
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_idle(proxy)


def test_a_flagged_stream_ends_with_content_filter_and_withholds_the_run(proxy,
                                                                        upstream) -> None:
    upstream.text, upstream.sizes = FLAGGED + " and more text after it." * 20, [4]
    upstream.pause = 0.02  # a paced upstream: the proxy must hang up, not drain it
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60, json={
            "model": "fake", "messages": ask(), "stream": True}) as reply:
        raw = b"".join(reply.iter_bytes())
    assert b"bomb" not in raw and b"fuse" not in raw  # not one byte of the flagged run
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "content_filter"
    assert last["qguard"]["risk_level"] == "Unsafe" and last["qguard"]["stage"] == "response"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if json.loads(e)["choices"])
    assert text == SAFE_PREFIX
    time.sleep(0.5)
    assert upstream.sent_chunks < len(upstream.deltas()) // 2  # the proxy stopped reading
    upstream.text, upstream.pause = FLAGGED, 0.0
    wait_idle(proxy)
    # the same through the openai client: content_filter, never the flagged words
    text, chunks = streamed(proxy)
    assert text == SAFE_PREFIX and chunks[-1].choices[0].finish_reason == "content_filter"


def test_non_streamed_completions_are_checked_whole(proxy, upstream) -> None:
    clean = client(proxy).chat.completions.create(model="fake", messages=ask())
    assert clean.choices[0].message.content == CLEAN
    assert clean.choices[0].finish_reason == "stop" and clean.usage.total_tokens == 8
    upstream.text = FLAGGED
    flagged = client(proxy).chat.completions.create(model="fake", messages=ask(), n=2)
    for choice in flagged.choices:
        assert choice.finish_reason == "content_filter"
        assert "bomb" not in (choice.message.content or "")
    wait_idle(proxy)


def test_n_choices_are_each_guarded_and_usage_passes(proxy, upstream) -> None:
    _, chunks = streamed(proxy, n=2, stream_options={"include_usage": True})
    by_choice = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            by_choice[choice.index] += choice.delta.content or ""
    assert by_choice == {0: CLEAN, 1: CLEAN}
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8
    wait_idle(proxy)


def test_upstream_errors_and_models_pass_through(proxy, upstream) -> None:
    assert [m.id for m in client(proxy).models.list()] == ["fake"]
    upstream.status = 429
    with pytest.raises(openai.RateLimitError, match="upstream says no"):
        client(proxy).chat.completions.create(model="fake", messages=ask(), stream=True)
    wait_idle(proxy)


def test_the_request_body_reaches_the_upstream_unchanged(proxy, upstream) -> None:
    client(proxy).chat.completions.create(model="fake", messages=ask(), temperature=0.3,
                                          extra_body={"top_k": 7, "vendor_field": [1, 2]})
    assert upstream.requests[-1]["top_k"] == 7 and upstream.requests[-1]["vendor_field"] == [1, 2]
    assert upstream.requests[-1]["temperature"] == 0.3


def test_an_upstream_failing_mid_stream_ends_the_stream_cleanly(proxy, upstream) -> None:
    upstream.fail_after = 3
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60, json={
            "model": "fake", "messages": ask(), "stream": True}) as reply:
        raw = b"".join(reply.iter_bytes()).decode()
    assert raw.rstrip().endswith("data: [DONE]")
    wait_idle(proxy)


def test_a_client_that_disconnects_frees_its_session(proxy, upstream) -> None:
    upstream.sizes = [1]
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60, json={
            "model": "fake", "messages": ask(), "stream": True}) as reply:
        next(reply.iter_bytes())  # read one piece, then hang up
    wait_idle(proxy)
    assert proxy.engine.pool.used_blocks == 0


def test_concurrent_streams_share_one_engine(proxy, upstream) -> None:
    async def one(client_: openai.AsyncOpenAI) -> str:
        stream = await client_.chat.completions.create(model="fake", messages=ask(),
                                                       stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> list[str]:
        client_ = openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(client_) for _ in range(32)))

    steps = proxy.engine.stats().steps
    assert asyncio.run(run()) == [CLEAN] * 32
    chunks = 32 * len(upstream.deltas())
    assert proxy.engine.stats().steps - steps < chunks  # batched: fewer steps than chunks
    wait_idle(proxy)


@pytest.fixture(scope="module")
def prompt_proxies(upstream: FakeUpstream, tmp_path_factory) -> Iterator[dict[str, Loopback]]:
    """Every prompt flags: <|im_end|>, where the prompt verdict is read, is a trigger."""
    engine = Engine(trigger_guard(tmp_path_factory.mktemp("prompt"), [IM_END]),
                    EngineSettings(max_tokens=4096))
    served = {mode: Loopback(create_proxy_app(engine, f"{upstream.loop.url}/v1",
                                              prompt_flag=mode))
              for mode in ("completion", "error")}
    yield served
    for loop in served.values():
        loop.stop()


def test_a_flagged_prompt_never_reaches_the_upstream(prompt_proxies, upstream) -> None:
    completion = client(prompt_proxies["completion"])
    answer = completion.chat.completions.create(model="fake", messages=ask())
    assert answer.choices[0].finish_reason == "content_filter"
    chunks = list(completion.chat.completions.create(model="fake", messages=ask(),
                                                     stream=True))
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    with pytest.raises(openai.BadRequestError, match="flagged"):
        client(prompt_proxies["error"]).chat.completions.create(model="fake", messages=ask())
    assert upstream.requests == []


def test_a_bad_policy_header_is_a_400(proxy) -> None:
    reply = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                       headers={"x-qguard-policy": "lenient"},
                       json={"model": "fake", "messages": ask()})
    assert reply.status_code == 400 and "policy" in reply.json()["error"]["message"]


def test_metrics_count_requests_flags_and_the_added_latency(proxy, upstream) -> None:
    streamed(proxy)
    upstream.text = FLAGGED
    streamed(proxy)
    text = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    assert 'qguard_proxy_requests_total{outcome="completed"}' in text
    assert 'qguard_proxy_requests_total{outcome="response_flagged"}' in text
    assert 'qguard_proxy_flags_total{category=' in text
    assert "qguard_proxy_added_seconds_per_chunk_count" in text
    assert httpx.get(f"{proxy.url}/health", timeout=10).json() == {"status": "ok"}


def test_the_proxy_can_use_a_guard_server(upstream, tmp_path_factory) -> None:
    """--guard-url: the same guarantees with the guard in a `qguard-stream serve` elsewhere."""
    engine = Engine(trigger_guard(tmp_path_factory.mktemp("remote"), [BOMB, FUSE]),
                    EngineSettings(max_tokens=65536))
    server = Loopback(create_app(engine, api_key="guard-key"))
    proxy = Loopback(create_proxy_app(None, f"{upstream.loop.url}/v1", guard_url=server.url,
                                      guard_api_key="guard-key"))
    try:
        text, chunks = streamed(proxy)
        assert text == CLEAN and chunks[-1].choices[0].finish_reason == "stop"
        upstream.text = FLAGGED
        text, chunks = streamed(proxy)
        assert text == SAFE_PREFIX and chunks[-1].choices[0].finish_reason == "content_filter"
        for _ in range(200):  # each request's connection, and its sessions, are gone
            if engine.stats().active_sessions == 0:
                break
            time.sleep(0.05)
        assert engine.pool.used_blocks == 0
        server.stop()  # the guard is gone: fail closed
        with pytest.raises(openai.InternalServerError, match="failing closed"):
            client(proxy).chat.completions.create(model="fake", messages=ask())
    finally:
        proxy.stop()
        server.stop()
