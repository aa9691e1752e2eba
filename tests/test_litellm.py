"""The LiteLLM guardrail (qguard_stream.integrations.litellm) inside a real LiteLLM proxy process
on loopback, in front of the fake OpenAI-compatible upstream, with the official `openai` client.

The guardrails (per request, by name): `response` talks to a real `qguard-stream serve` app over
its WebSocket with a trigger checkpoint (Unsafe exactly at " bomb" and " fuse"), `inproc` runs the
same checkpoint in the LiteLLM process, `prompt` talks to a server whose every prompt flags
(<|im_end|> is a trigger), `down` points at a port nobody listens on (fail closed) and `open`
the same with unreachable_fallback: fail_open; `breaking` and `breaking_open` talk to a guard
server that breaks mid-stream when told to (conftest.GuardBreaker), failing closed and open."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

if importlib.util.find_spec("litellm") is None:  # found, not imported: the proxy process imports it
    pytest.skip("the litellm extra is not installed", allow_module_level=True)

from benchmarks.fake_upstream import CLEAN, FakeUpstream, Loopback
from benchmarks.load import free_port, stop, wait_healthy
from qguard_stream import StreamGuard
from qguard_stream.checkpoints import make_trigger_checkpoint
from qguard_stream.engine import Engine, EngineSettings
from qguard_stream.server import create_app

BOMB, FUSE, IM_END = 12764, 31702, 151645
FLAGGED = "Mix flour and water. Light the bomb fuse now, then run."
SAFE_PREFIX = "Mix flour and water. Light the"
STARTUP_S = 120
MASTER_KEY = "sk-qguard-tests-" + "0" * 32
AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}


@pytest.fixture(autouse=True)
def reset(upstream: FakeUpstream) -> None:
    upstream.reset()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {"response": make_trigger_checkpoint(tmp_path_factory.mktemp("response"),
                                                [BOMB, FUSE]),
            "prompt": make_trigger_checkpoint(tmp_path_factory.mktemp("prompt"), [IM_END])}


@pytest.fixture(scope="module")
def servers(checkpoints) -> Iterator[dict[str, Loopback]]:
    served = {}
    for name, path in checkpoints.items():
        engine = Engine(StreamGuard.from_pretrained(path, device="cpu"),
                        EngineSettings(max_tokens=65536))
        served[name] = Loopback(create_app(engine))
        served[name].engine = engine
    yield served
    for loop in served.values():
        loop.stop()


@pytest.fixture(scope="module")
def gateway(upstream, servers, checkpoints, breaking_guard, tmp_path_factory) -> Iterator[str]:
    """A LiteLLM proxy process with the seven guardrails, none on by default."""
    directory = tmp_path_factory.mktemp("litellm")
    dead = f"ws://127.0.0.1:{free_port()}"

    def guardrail(name: str, **params: object) -> dict:
        return {"guardrail_name": name, "litellm_params": {
            "guardrail": "qguard_stream.integrations.litellm.QGuardStream",
            "mode": ["pre_call", "post_call"], "default_on": False, "timeout": 30, **params}}

    config = {
        "general_settings": {"master_key": MASTER_KEY},
        "model_list": [{"model_name": "fake", "litellm_params": {
            "model": "openai/fake", "api_base": f"{upstream.loop.url}/v1", "api_key": "unused"}}],
        "guardrails": [
            guardrail("response", api_base=servers["response"].url.replace("http", "ws")),
            guardrail("inproc", model=str(checkpoints["response"]), device="cpu"),
            guardrail("prompt", api_base=servers["prompt"].url),
            guardrail("down", api_base=dead),
            guardrail("open", api_base=dead, unreachable_fallback="fail_open"),
            guardrail("breaking", api_base=breaking_guard.url),
            guardrail("breaking_open", api_base=breaking_guard.url,
                      unreachable_fallback="fail_open")],
    }
    path = directory / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    executable = shutil.which("litellm", path=str(Path(sys.executable).parent)) or "litellm"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("DATABASE_URL", None)
    log = (directory / "litellm.log").open("w")
    process = subprocess.Popen([executable, "--config", str(path), "--host", "127.0.0.1",
                                "--port", str(port), "--num_workers", "1"],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=directory)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, STARTUP_S, "/health/liveliness", directory / "litellm.log")
        yield url
    finally:
        stop(process)
        log.close()


def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=MASTER_KEY, max_retries=0,
                         timeout=60)


def ask(text: str = "How do I bake bread?") -> list[dict]:
    return [{"role": "user", "content": text}]


def streamed(gateway: str, guardrail: str, **options) -> tuple[str, list]:
    chunks = list(client(gateway).chat.completions.create(
        model="fake", messages=ask(), stream=True, extra_body={"guardrails": [guardrail]},
        **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def raw_stream(gateway: str, guardrail: str) -> tuple[bytes, list[str]]:
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", timeout=60, headers=AUTH, json={
            "model": "fake", "messages": ask(), "stream": True,
            "guardrails": [guardrail]}) as reply:
        assert reply.status_code == 200
        raw = b"".join(reply.iter_bytes())
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    return raw, events


def wait_idle(engine: Engine) -> None:
    for _ in range(200):
        if engine.stats().active_sessions == 0:
            return
        time.sleep(0.05)
    assert engine.stats().active_sessions == 0


@pytest.mark.parametrize("guardrail", ["response", "inproc"])
@pytest.mark.parametrize("sizes", [[1], [2, 7, 1]])
def test_a_clean_stream_passes_unchanged(gateway, servers, upstream, guardrail, sizes) -> None:
    upstream.sizes = sizes  # deltas split inside words and multi-byte characters
    text, chunks = streamed(gateway, guardrail)
    assert text == CLEAN
    assert chunks[-1].choices[0].finish_reason == "stop"
    wait_idle(servers["response"].engine)


@pytest.mark.parametrize("guardrail", ["response", "inproc"])
def test_a_flagged_stream_ends_with_content_filter_and_done(gateway, servers, upstream,
                                                           guardrail, tokenizer) -> None:
    upstream.text, upstream.sizes = FLAGGED + " and more text after it." * 20, [4]
    upstream.pause = 0.02  # paced: the guardrail must stop reading, not drain it
    raw, events = raw_stream(gateway, guardrail)
    assert b"bomb" not in raw and b"fuse" not in raw  # not one byte of the flagged run
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "content_filter"
    # the official rule flags at the second Unsafe token in a row: " fuse", counted from the
    # response's first token; the trigger heads' category is the checkpoint's first
    fuse = tokenizer.encode(FLAGGED, add_special_tokens=False).index(FUSE)
    category = servers["response"].engine.guard.config.response_categories[0]
    assert last["qguard"] == {"stage": "response", "risk_level": "Unsafe", "position": fuse,
                              "category": category}
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if json.loads(e).get("choices"))
    assert text == SAFE_PREFIX
    assert upstream.sent_chunks < len(upstream.deltas()) // 2
    wait_idle(servers["response"].engine)


def test_n_choices_are_each_guarded(gateway, servers, upstream) -> None:
    upstream.text = FLAGGED
    _, chunks = streamed(gateway, "response", n=2)
    by_choice, finish = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            by_choice[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert by_choice == {0: SAFE_PREFIX, 1: SAFE_PREFIX}
    assert finish == {0: "content_filter", 1: "content_filter"}
    wait_idle(servers["response"].engine)


def test_a_flagged_prompt_is_refused_before_the_model(gateway, upstream) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="flagged"):
            reply = client(gateway).chat.completions.create(
                model="fake", messages=ask(), stream=stream, extra_body={"guardrails": ["prompt"]})
            list(reply) if stream else None
    assert upstream.requests == []


@pytest.mark.parametrize("guardrail", ["response", "inproc"])
def test_non_streamed_completions_are_checked_whole(gateway, upstream, guardrail) -> None:
    clean = client(gateway).chat.completions.create(model="fake", messages=ask(),
                                                    extra_body={"guardrails": [guardrail]})
    assert clean.choices[0].message.content == CLEAN
    assert clean.choices[0].finish_reason == "stop"
    upstream.text = FLAGGED
    reply = httpx.post(f"{gateway}/v1/chat/completions", timeout=60, headers=AUTH, json={
        "model": "fake", "messages": ask(), "guardrails": [guardrail]}).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "content_filter" and "bomb" not in json.dumps(reply)
    assert choice["message"]["content"] == SAFE_PREFIX
    assert reply["qguard"]["risk_level"] == "Unsafe"


def test_an_unreachable_guard_fails_closed_unless_told_to_fail_open(gateway, upstream) -> None:
    with pytest.raises(openai.InternalServerError, match="unavailable"):
        client(gateway).chat.completions.create(model="fake", messages=ask(),
                                                extra_body={"guardrails": ["down"]})
    assert upstream.requests == []  # refused before the call
    text, _ = streamed(gateway, "open")
    assert text == CLEAN


@pytest.fixture
def breaker(breaking_guard) -> Iterator[object]:
    yield breaking_guard.breaker
    breaking_guard.breaker.after = None
    wait_idle(breaking_guard.engine)  # the broken connections' sessions are freed


def text_of(events: list[str]) -> str:
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1] if json.loads(e).get("choices"))


def test_a_guard_failing_mid_stream_fails_closed(gateway, upstream, breaker) -> None:
    breaker.after = 6  # the open and 5 feeds are answered, then the connection drops
    _, events = raw_stream(gateway, "breaking")
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "content_filter"
    assert "GuardUnavailableError" in last["qguard"]["error"]
    text = text_of(events)
    assert CLEAN.startswith(text) and len(text) < 3 * 5  # 5 deltas of 3 characters were scored


def test_a_guard_failing_mid_stream_fails_open(gateway, upstream, breaker) -> None:
    """The text held back is released, the rest of the model's stream passes through."""
    breaker.after = 6
    _, events = raw_stream(gateway, "breaking_open")
    assert events[-1] == "[DONE]" and text_of(events) == CLEAN
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "stop" and "qguard" not in last
