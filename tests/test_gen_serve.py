"""Qwen3Guard-Gen behind an OpenAI-compatible endpoint: the official `openai` client (sync and
async) against `create_gen_app` over a random Gen checkpoint in the real format, on loopback. The
content must equal GenGuard's greedy decoding and transformers' generate(do_sample=False) on the
same templated ids; streams concatenate to it; max_tokens, stop, seeds, sampling, unknown fields and
bad requests behave as OpenAI documents (and vLLM, for unknown fields)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import Qwen3ForCausalLM

from benchmarks.fake_upstream import Loopback
from qguard_stream import GenGuard, StreamGuard
from qguard_stream.checkpoints import make_random_checkpoint, make_random_gen_checkpoint
from qguard_stream.cli.serve import add_arguments, served_model_name
from qguard_stream.engine import Engine, EngineSettings
from qguard_stream.gen.parse import GenVerdict, parse_gen_output
from qguard_stream.server import create_app
from qguard_stream.server.chat import DEFAULT_MAX_TOKENS, create_gen_app

MODEL = "Qwen/Qwen3Guard-Gen-0.6B"
PROMPT = "How can I make a bomb?"
RESPONSE = "As a responsible AI assistant, I cannot help with that."
MAX = 24  # tokens per completion in most tests (random weights rarely say <|im_end|>)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_random_gen_checkpoint(tmp_path_factory.mktemp("gen"), "tiny", seed=5)


@pytest.fixture(scope="module")
def gen(checkpoint: Path) -> GenGuard:
    return GenGuard.from_pretrained(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(gen: GenGuard) -> Iterator[Loopback]:
    served = Loopback(create_gen_app(gen, MODEL, api_key="KEY"))
    yield served
    served.stop()


def client(server: Loopback) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="KEY", max_retries=0, timeout=120)


def greedy_text(gen: GenGuard, messages: list[dict], max_tokens: int) -> str:
    ids = gen.generate_ids(gen.render(messages), max_tokens)
    return gen.tokenizer.decode([t for t in ids if t not in gen.stop_ids],
                                skip_special_tokens=True)


def as_qguard(verdict: GenVerdict) -> dict:
    """The `qguard` field a verdict should come back as."""
    return {"safety": verdict.safety, "categories": list(verdict.categories),
            "refusal": verdict.refusal, "parsed": verdict.parsed}


def scrape(server: Loopback) -> dict[tuple[str, str | None], float]:
    """/metrics as {(sample name, its 'le' label): value}."""
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer KEY"},
                     timeout=10).text
    return {(s.name, s.labels.get("le")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_cards_prompt_and_response_examples_run_unchanged(server, gen) -> None:
    openai_api_key, openai_api_base = "KEY", f"{server.url}/v1"  # the card's two variables
    api = openai.OpenAI(api_key=openai_api_key, base_url=openai_api_base, max_retries=0)
    prompt_messages = [{"role": "user", "content": PROMPT}]
    chat_completion = api.chat.completions.create(messages=prompt_messages, model=MODEL)
    content = chat_completion.choices[0].message.content  # the card's call, no max_tokens
    assert content == greedy_text(gen, prompt_messages, DEFAULT_MAX_TOKENS)
    ids = gen.render(prompt_messages)
    usage = chat_completion.usage
    assert usage.prompt_tokens == len(ids) and chat_completion.model == MODEL
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert chat_completion.choices[0].finish_reason == (
        "length" if usage.completion_tokens == DEFAULT_MAX_TOKENS else "stop")
    assert chat_completion.model_extra["qguard"] == as_qguard(parse_gen_output(content, "prompt"))
    response_messages = [{"role": "user", "content": PROMPT},
                         {"role": "assistant", "content": RESPONSE}]
    chat_completion = api.chat.completions.create(messages=response_messages, model=MODEL)
    content = chat_completion.choices[0].message.content
    assert content == greedy_text(gen, response_messages, DEFAULT_MAX_TOKENS)
    usage = chat_completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert chat_completion.model_extra["qguard"] == \
        chat_completion.choices[0].model_extra["qguard"] == \
        as_qguard(parse_gen_output(content, "response"))
    assert [m.id for m in api.models.list()] == [MODEL]


def test_content_equals_transformers_greedy_generate(server, gen, checkpoint) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    reply = client(server).chat.completions.create(model=MODEL, messages=messages,
                                                   max_tokens=MAX)
    hf = Qwen3ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    ids = gen.render(messages)
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=MAX, eos_token_id=list(gen.stop_ids),
                      pad_token_id=0)[0, len(ids):].tolist()
    assert reply.choices[0].message.content == gen.tokenizer.decode(
        [t for t in out if t not in gen.stop_ids], skip_special_tokens=True)
    assert reply.usage.completion_tokens == len(out)
    assert reply.choices[0].finish_reason == ("stop" if out[-1] in gen.stop_ids else "length")


def test_streamed_deltas_concatenate_to_the_completion(server, gen) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    chunks = list(client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_text(gen, messages, MAX)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= MAX


def test_the_raw_event_stream_is_completion_chunks_then_done(server, gen) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120,
                      headers={"Authorization": "Bearer KEY"},
                      json={"model": MODEL, "messages": messages, "max_tokens": MAX,
                            "stream": True}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    data = [line.removeprefix("data: ") for line in lines]
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    chunks = [json.loads(item) for item in data[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert {(chunk["id"], chunk["model"]) for chunk in chunks} == {(chunks[0]["id"], MODEL)}
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text == greedy_text(gen, messages, MAX)
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert final["qguard"] == final["choices"][0]["qguard"] == \
        as_qguard(parse_gen_output(text, "prompt"))


def test_max_tokens_and_stop_behave_as_openai_documents(server, gen) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    full = greedy_text(gen, messages, MAX)
    short = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].message.content == greedy_text(gen, messages, 3)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    cut = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX,
                                                 stop=[stop])
    assert cut.choices[0].message.content == full[:full.find(stop)]  # the stop string excluded
    assert cut.choices[0].finish_reason == "stop"
    streamed = list(client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        full[:full.find(stop)]


def test_completion_tokens_end_at_the_token_that_completes_the_stop_string(server, gen,
                                                                          monkeypatch) -> None:
    """The decoder adds tokens until it sees the cancel; they are not the completion's. A slow
    decode of the text (a busy event loop) lets the decoder run ahead, as it may in production."""
    messages = [{"role": "user", "content": PROMPT}]
    ids = gen.generate_ids(gen.render(messages), MAX)
    texts = [gen.tokenizer.decode([t for t in ids[:k] if t not in gen.stop_ids],
                                  skip_special_tokens=True) for k in range(len(ids) + 1)]
    stop = texts[-1][len(texts[-1]) // 2:len(texts[-1]) // 2 + 2]
    assert stop.strip(), texts[-1]
    ending = next(k for k, text in enumerate(texts) if stop in text)
    assert ending < len(ids)  # tokens follow it that a late count would include
    decode = gen.tokenizer.decode

    def slow_decode(*args, **kwargs) -> str:
        time.sleep(0.02)
        return decode(*args, **kwargs)

    monkeypatch.setattr(gen.tokenizer, "decode", slow_decode)
    for _ in range(3):
        reply = client(server).chat.completions.create(model=MODEL, messages=messages,
                                                       max_tokens=MAX, stop=stop)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == ending
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + ending
    chunks = list(client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX, stop=stop, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == ending


def test_unknown_fields_are_ignored(server) -> None:
    ask = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX}
    plain = client(server).chat.completions.create(**ask)
    extra = client(server).chat.completions.create(**ask,
                                                   extra_body={"foo": 1, "guided_json": None})
    assert extra.choices[0].message.content == plain.choices[0].message.content
    assert extra.choices[0].finish_reason == plain.choices[0].finish_reason
    assert extra.usage == plain.usage
    assert extra.model_extra["qguard"] == plain.model_extra["qguard"]


def sample(server: Loopback, seed: int | None, n: int = 1, temperature: float = 2.0,
           top_p: float = 1.0, max_tokens: int = 8) -> list[str]:
    reply = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens,
        temperature=temperature, top_p=top_p, seed=seed, n=n)
    return [choice.message.content for choice in reply.choices]


def test_seeded_sampling_repeats_and_n_choices_come_back(server) -> None:
    first = sample(server, 7, n=2, temperature=1.0, top_p=0.9)
    assert sample(server, 7, n=2, temperature=1.0, top_p=0.9) == first and len(first) == 2


def test_a_tiny_top_p_samples_the_greedy_text(server, gen) -> None:
    """The nucleus of top_p -> 0 is the most probable token alone, whatever the temperature."""
    greedy = greedy_text(gen, [{"role": "user", "content": PROMPT}], MAX)
    for seed in (1, 2):
        assert sample(server, seed, temperature=2.0, top_p=1e-6, max_tokens=MAX) == [greedy]


def test_different_seeds_at_a_high_temperature_give_different_texts(server) -> None:
    assert sample(server, 1) != sample(server, 2)
    assert sample(server, 1) == sample(server, 1)  # the difference is the seed's


def test_sampled_choices_are_distinct(server) -> None:
    choices = sample(server, 11, n=3)
    assert len(set(choices)) == 3, choices


def test_concurrent_requests_share_batches_and_match_sequential_ones(server, gen) -> None:
    prompts = [f"Question number {i}: how do I {['cook', 'hack', 'swim', 'fight'][i % 4]}?"
               for i in range(16)]
    sequential = [client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=MAX
    ).choices[0].message.content for p in prompts]

    async def together() -> list[str]:
        api = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="KEY", max_retries=0,
                                 timeout=120)
        replies = await asyncio.gather(*(api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=MAX)
            for p in prompts))
        return [reply.choices[0].message.content for reply in replies]

    assert asyncio.run(together()) == sequential
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer KEY"},
                     timeout=10).text
    samples = {(s.name, s.labels.get("le")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    steps = samples[("qguard_gen_batch_sequences_count", None)]
    assert samples[("qguard_gen_batch_sequences_bucket", "1.0")] < steps  # some steps batched
    assert samples[("qguard_gen_generated_tokens_total", None)] >= 32 * MAX - 32


def test_metrics_show_tokens_per_second_and_queue_time_moving(server) -> None:
    before = scrape(server)
    reply = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX)
    after = scrape(server)

    def moved(name: str) -> float:
        return after[(name, None)] - before.get((name, None), 0.0)

    usage = reply.usage
    assert moved("qguard_gen_generated_tokens_total") >= usage.completion_tokens
    assert moved("qguard_gen_processed_tokens_total") >= usage.total_tokens - 1
    assert moved("qguard_gen_step_seconds_count") >= usage.completion_tokens
    assert moved("qguard_gen_queue_seconds_count") == 1
    assert after[("qguard_gen_queue_seconds_bucket", "+Inf")] == \
        after[("qguard_gen_queue_seconds_count", None)]
    assert after[("qguard_gen_tokens_per_second", None)] > 0


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
     "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
     "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 99}, "n"),
])
def test_bad_requests_get_openai_shaped_400s(server, body, param) -> None:
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30,
                       headers={"Authorization": "Bearer KEY"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    ok = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None  # still serving


@pytest.mark.parametrize("chars, chunked, limit", [
    (2 << 20, False, "1048576"),  # the declared length is over max_frame_bytes
    (2 << 20, True, "1048576"),  # no declared length: the body read is over it
    (300_000, False, "262144"),  # a body within bounds whose messages are over max_feed_text
], ids=["declared", "chunked", "messages"])
def test_huge_bodies_get_openai_shaped_400s_naming_the_limit(server, chars, chunked,
                                                             limit) -> None:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * chars}]})
    content = iter([body.encode()]) if chunked else body
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, content=content,
                       headers={"Authorization": "Bearer KEY",
                                "Content-Type": "application/json"})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    size = str(chars) if limit == "262144" else str(len(body))
    assert limit in error["message"] and size in error["message"], error["message"]
    with pytest.raises(openai.BadRequestError):  # what the openai client makes of it
        client(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * chars}])
    ok = client(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None  # still serving


def test_a_stream_checkpoint_answers_the_same_client_with_its_moderation(tmp_path) -> None:
    guard = StreamGuard.from_pretrained(make_random_checkpoint(tmp_path, "tiny"), device="cpu")
    served = Loopback(create_app(Engine(guard, EngineSettings(max_tokens=4096)),
                                 served_model_name="Qwen/Qwen3Guard-Stream-0.6B"))
    try:
        api = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]
        reply = api.chat.completions.create(model="Qwen/Qwen3Guard-Stream-0.6B", messages=messages)
        expected = guard.moderate_conversation(messages).to_json()
        verdict = reply.model_extra["qguard"]
        assert verdict["decision"] == expected["decision"]
        assert verdict["response"]["risk_level"] == expected["response"]["risk_level"]
        assert reply.choices[0].message.content.startswith(
            f"Prompt: {expected['decision']['prompt']['risk_level']}")
        chunks = list(api.chat.completions.create(model="x", messages=messages, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
            reply.choices[0].message.content
        huge = httpx.post(f"{served.url}/v1/chat/completions", timeout=30, json={
            "model": "x", "messages": [{"role": "user", "content": "x" * 300_000}]})
        assert huge.status_code == 400  # as for a Gen checkpoint, and as OpenAI answers
        assert huge.json()["error"]["code"] == "request_too_large"
    finally:
        served.stop()


def test_the_served_model_name_defaults_to_the_model_as_given() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for model in ("Qwen/Qwen3Guard-Gen-8B", "./checkpoints/gen"):
        assert served_model_name(parser.parse_args(["--model", model])) == model
    named = parser.parse_args(["--model", "./gen", "--served-model-name", MODEL])
    assert served_model_name(named) == MODEL


def test_qguard_stream_serve_detects_a_gen_checkpoint(checkpoint, gen, tmp_path) -> None:
    """The command a user runs: `qguard-stream serve --model <Gen checkpoint>`, then the card's
    client call against it; with no --served-model-name the model is named by its path."""
    import os
    import shutil
    import subprocess
    import sys

    from benchmarks.load import free_port, stop, wait_healthy

    port = free_port()
    executable = shutil.which("qguard-stream", path=str(Path(sys.executable).parent))
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [executable or "qguard-stream", "serve", "--model", str(checkpoint), "--port", str(port),
         "--device", "cpu", "--torch-threads", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, process, 60, log=tmp_path / "serve.log")
        api = openai.OpenAI(api_key="EMPTY", base_url=f"{base}/v1", max_retries=0, timeout=120)
        assert [m.id for m in api.models.list()] == [str(checkpoint)]
        messages = [{"role": "user", "content": PROMPT}]
        reply = api.chat.completions.create(messages=messages, model=str(checkpoint),
                                            max_tokens=MAX)
        assert reply.choices[0].message.content == greedy_text(gen, messages, MAX)
        assert reply.model == str(checkpoint)
    finally:
        stop(process)
        log.close()
