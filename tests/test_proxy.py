"""The guard proxy (`qguard-stream proxy`) between the official `openai` client and a fake
OpenAI-compatible upstream, both real servers on loopback. The guard is a trigger checkpoint:
Unsafe exactly at the tokens " bomb" and " fuse" (two adjacent: the official rule flags),
Controversial exactly at " pill" and " powder" (two adjacent: only the strict policy flags)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from benchmarks.fake_upstream import CLEAN, FakeUpstream, Loopback
from benchmarks.load import free_port, stop, wait_healthy
from qguard_stream import StreamGuard
from qguard_stream.checkpoints import make_trigger_checkpoint
from qguard_stream.cli.proxy import UPSTREAM_KEY_ENV
from qguard_stream.cli.serve import API_KEY_ENV
from qguard_stream.engine import Engine, EngineSettings
from qguard_stream.proxy.app import create_proxy_app
from qguard_stream.server import create_app

BOMB, FUSE, IM_END, PILL, POWDER = 12764, 31702, 151645, 15177, 16723
FLAGGED = "Mix flour and water. Light the bomb fuse now, then run."
SAFE_PREFIX = "Mix flour and water. Light the"  # released: everything before the flagged run
CONTROVERSIAL = "Swallow the pill powder fast."
WORDS = ["Mix", " flour", " and", " water", ".", " Light", " the", " bomb", " fuse", " now", ",",
         " then", " run", "."]  # FLAGGED's tokens


@pytest.fixture(autouse=True)
def reset(upstream: FakeUpstream) -> None:
    upstream.reset()


def trigger_guard(directory: Path, tokens: list[int],
                  controversial: list[int] | None = None) -> StreamGuard:
    return StreamGuard.from_pretrained(
        make_trigger_checkpoint(directory, tokens, controversial or []), device="cpu")


@pytest.fixture(scope="module")
def proxy(upstream: FakeUpstream, tmp_path_factory) -> Iterator[Loopback]:
    engine = Engine(trigger_guard(tmp_path_factory.mktemp("trig"), [BOMB, FUSE], [PILL, POWDER]),
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


def sse(proxy: Loopback, **body) -> tuple[bytes, list[dict | str]]:
    """A streamed request read as raw bytes, and its events (JSON, or the "[DONE]" string)."""
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60, json={
            "model": "fake", "messages": ask(), "stream": True, **body}) as reply:
        raw = b"".join(reply.iter_bytes())
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    return raw, [e if e == "[DONE]" else json.loads(e) for e in events]


def text_of(events: list[dict | str]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.parametrize("sizes", [[1], [3], [2, 7, 1], [40]])
def test_a_clean_stream_reaches_the_client_unchanged(proxy, upstream, sizes) -> None:
    upstream.sizes = sizes  # deltas split inside words and multi-byte characters
    text, chunks = streamed(proxy)
    assert text == CLEAN
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_idle(proxy)


def test_a_flagged_stream_ends_with_content_filter_and_withholds_the_run(proxy, upstream,
                                                                        tokenizer) -> None:
    upstream.text, upstream.sizes = FLAGGED + " and more text after it." * 20, [4]
    upstream.pause = 0.02  # a paced upstream: the proxy must hang up, not drain it
    raw, events = sse(proxy)
    assert b"bomb" not in raw and b"fuse" not in raw  # not one byte of the flagged run
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"][0]["finish_reason"] == "content_filter"
    # the official rule flags at the second Unsafe token in a row: " fuse", counted from the
    # response's first token; the trigger heads' category is the checkpoint's first
    fuse = tokenizer.encode(FLAGGED, add_special_tokens=False).index(FUSE)
    assert last["qguard"] == last["choices"][0]["qguard"] == {
        "stage": "response", "risk_level": "Unsafe", "position": fuse,
        "category": proxy.engine.guard.config.response_categories[0]}
    assert text_of(events) == SAFE_PREFIX
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
    upstream.fail_after = 8  # 24 characters, then the connection drops
    _, events = sse(proxy)
    assert events[-1] == "[DONE]"
    last = events[-2]  # the held-back text (unguarded yet) is withheld; the error named
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]
    assert last["qguard"]["stage"] == "response" and "RemoteProtocolError" in \
        last["qguard"]["error"]
    text = text_of(events)
    assert CLEAN[:24].startswith(text) and len(text) < 24
    wait_idle(proxy)


def test_a_client_that_disconnects_mid_stream_frees_its_session(proxy, upstream) -> None:
    upstream.sizes, upstream.pause = [1], 0.05  # 3 s of stream: the client leaves long before
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60, json={
            "model": "fake", "messages": ask(), "stream": True}) as reply:
        for line in reply.iter_lines():  # until some text has come through, then hang up
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"):
                assert proxy.engine.stats().active_sessions == 1  # the stream's, still live
                break
    wait_idle(proxy)
    assert proxy.engine.pool.used_blocks == 0
    assert upstream.sent_chunks < len(upstream.deltas()) // 2  # it stopped reading upstream


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
    for loop in served.values():
        loop.engine = engine
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


def test_a_flagged_prompt_streams_one_refusal_chunk_then_done(prompt_proxies, upstream,
                                                              tokenizer) -> None:
    engine = prompt_proxies["completion"].engine
    with httpx.stream("POST", f"{prompt_proxies['completion'].url}/v1/chat/completions",
                      timeout=60, json={"model": "fake", "messages": ask(),
                                        "stream": True}) as reply:
        raw = b"".join(reply.iter_bytes()).decode()
        headers = reply.headers
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert len(events) == 2 and events[1] == "[DONE]"
    refusal = json.loads(events[0])
    assert refusal["choices"] == [{"index": 0, "finish_reason": "content_filter",
                                   "delta": {"role": "assistant", "content": ""}}]
    category = engine.guard.config.query_categories[0]
    # read at the user turn's <|im_end|>, after "<|im_start|>user\n" (3 tokens) and the question
    question = tokenizer.encode(ask()[0]["content"], add_special_tokens=False)
    assert refusal["qguard"] == {"stage": "prompt", "risk_level": "Unsafe",
                                 "category": category, "position": 3 + len(question)}
    assert headers["x-qguard-prompt-risk"] == "Unsafe"
    assert headers["x-qguard-prompt-category"] == category
    assert upstream.requests == []


def test_a_safe_prompt_verdict_is_in_the_response_headers(proxy) -> None:
    for stream in (False, True):
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", timeout=60, json={
                "model": "fake", "messages": ask(), "stream": stream}) as reply:
            reply.read()
        assert reply.status_code == 200
        assert reply.headers["x-qguard-prompt-risk"] == "Safe"
        assert "x-qguard-prompt-category" not in reply.headers  # none on a Safe prompt


def test_a_bad_policy_header_is_a_400(proxy) -> None:
    reply = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                       headers={"x-qguard-policy": "lenient"},
                       json={"model": "fake", "messages": ask()})
    assert reply.status_code == 400 and "policy" in reply.json()["error"]["message"]


def test_the_policy_header_chooses_the_policy_per_request(proxy, upstream, tokenizer) -> None:
    """" pill powder" is a Controversial run: reported by the official rule, flagged by strict."""
    upstream.text = CONTROVERSIAL
    text, chunks = streamed(proxy)
    assert text == CONTROVERSIAL and chunks[-1].choices[0].finish_reason == "stop"
    text, chunks = streamed(proxy, extra_headers={"x-qguard-policy": "strict"})
    assert text == "Swallow the" and chunks[-1].choices[0].finish_reason == "content_filter"
    powder = tokenizer.encode(CONTROVERSIAL, add_special_tokens=False).index(POWDER)
    assert chunks[-1].model_extra["qguard"] == {
        "stage": "response", "risk_level": "Controversial", "position": powder,
        "category": proxy.engine.guard.config.response_categories[0]}
    text, _ = streamed(proxy, extra_headers={"x-qguard-policy": "official"})
    assert text == CONTROVERSIAL  # the header, not a leftover, chose strict
    wait_idle(proxy)


def test_metrics_count_requests_flags_and_the_added_latency(proxy, upstream,
                                                            tokenizer) -> None:
    name = "qguard_proxy_tokens_scored_total"
    before = metric(proxy.url, name)
    streamed(proxy)
    expected = before + len(tokenizer.encode(CLEAN, add_special_tokens=False))
    for _ in range(100):  # counted as the stream's handler ends, just after [DONE]
        if metric(proxy.url, name) >= expected:
            break
        time.sleep(0.05)
    assert metric(proxy.url, name) == expected  # every response token, once
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


def test_fail_open_forwards_unguarded_when_the_guard_is_unreachable(upstream, caplog) -> None:
    proxy = Loopback(create_proxy_app(None, f"{upstream.loop.url}/v1", fail_open=True,
                                      guard_url=f"ws://127.0.0.1:{free_port()}"))
    try:
        upstream.text = FLAGGED  # unguarded: even the flagged run comes through
        text, chunks = streamed(proxy)
        assert text == FLAGGED and chunks[-1].choices[0].finish_reason == "stop"
        reply = client(proxy).chat.completions.create(model="fake", messages=ask())
        assert reply.choices[0].message.content == FLAGGED
        assert len(upstream.requests) == 2 and "failing open" in caplog.text
        assert metric(proxy.url, 'qguard_proxy_requests_total{outcome="guard_failed_open"}') == 2
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def breaking_proxies(upstream: FakeUpstream, breaking_guard) -> Iterator[dict[str, Loopback]]:
    """Proxies over a guard server that breaks mid-stream, failing open and closed."""
    served = {mode: Loopback(create_proxy_app(None, f"{upstream.loop.url}/v1",
                                              guard_url=breaking_guard.url,
                                              fail_open=mode == "open"))
              for mode in ("open", "closed")}
    yield served
    for loop in served.values():
        loop.stop()


@pytest.fixture
def breaker(breaking_guard) -> Iterator[object]:
    yield breaking_guard.breaker
    breaking_guard.breaker.after = None
    wait_idle(breaking_guard)  # the broken connections' sessions are freed


def test_a_guard_failing_mid_stream_fails_closed(breaking_proxies, upstream, breaker) -> None:
    breaker.after = 6  # the open and 5 feeds are answered, then the connection drops
    _, events = sse(breaking_proxies["closed"])
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]
    assert "GuardUnavailableError" in last["qguard"]["error"]
    text = text_of(events)
    assert CLEAN.startswith(text) and len(text) < 3 * 5  # 5 deltas of 3 characters were scored


@pytest.mark.parametrize("n, after", [(1, 6), (2, 7)])  # n=2: the 2nd choice's feed fails
def test_a_guard_failing_mid_stream_fails_open(breaking_proxies, upstream, breaker, caplog,
                                               n, after) -> None:
    """The text held back is released, the rest of the upstream passes through as sent."""
    breaker.after = after  # the open(s) and some feeds are answered, then the connection drops
    _, events = sse(breaking_proxies["open"], n=n)
    assert events[-1] == "[DONE]"
    by_choice, finish = dict.fromkeys(range(n), ""), {}
    for event in events[:-1]:
        for choice in event["choices"]:
            by_choice[choice["index"]] += choice["delta"].get("content") or ""
            finish[choice["index"]] = choice["finish_reason"] or finish.get(choice["index"])
        assert "qguard" not in event
    assert by_choice == dict.fromkeys(range(n), CLEAN)
    assert finish == dict.fromkeys(range(n), "stop")
    assert "failing open, the rest passes unguarded" in caplog.text
    upstream.text = FLAGGED  # from the failure on, nothing is guarded
    _, events = sse(breaking_proxies["open"])
    assert text_of(events) == FLAGGED


def test_a_guard_failing_on_a_whole_completion(breaking_proxies, upstream, breaker) -> None:
    breaker.after = 1  # the prompt is scored, the completion's feed is not answered
    with pytest.raises(openai.InternalServerError, match="failing closed"):
        client(breaking_proxies["closed"]).chat.completions.create(model="fake", messages=ask())
    reply = client(breaking_proxies["open"]).chat.completions.create(model="fake",
                                                                     messages=ask())
    assert reply.choices[0].message.content == CLEAN
    assert reply.choices[0].finish_reason == "stop"


def test_the_cli_serves_the_proxy(upstream, tmp_path, tokenizer) -> None:
    """`python -m qguard_stream.cli proxy` as a user runs it: the guard loaded from --model, the
    keys from the environment, the default holdback (2)."""
    checkpoint = make_trigger_checkpoint(tmp_path / "guard", [BOMB, FUSE])
    port, log = free_port(), tmp_path / "proxy.log"
    env = {**os.environ, API_KEY_ENV: "proxy-key", UPSTREAM_KEY_ENV: "upstream-key",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "qguard_stream.cli", "proxy", "--upstream",
             f"{upstream.loop.url}/v1", "--model", str(checkpoint), "--device", "cpu",
             "--port", str(port), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, 120, log=log)
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="proxy-key", max_retries=0,
                              timeout=60)
        chunks = list(keyed.chat.completions.create(model="fake", messages=ask(), stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == CLEAN
        assert upstream.authorizations == ["Bearer upstream-key"]
        assert [tokenizer.decode([token]) for token in
                tokenizer.encode(FLAGGED, add_special_tokens=False)] == WORDS
        upstream.text, upstream.sizes = FLAGGED, [len(word) for word in WORDS]  # a token each
        chunks = list(keyed.chat.completions.create(model="fake", messages=ask(), stream=True))
        contents = [c.choices[0].delta.content or "" for c in chunks]
        assert "".join(contents) == SAFE_PREFIX
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert chunks[-1].model_extra["qguard"]["position"] == WORDS.index(" fuse")
        # a token is scored once the next delta shows it complete, and released after 2 more
        # were scored: "Mix" leaves with the 4th delta (" water"; chunk 0 is the role's)
        assert contents.index("Mix") == 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0,
                          timeout=60).models.list()
    finally:
        stop(process)
