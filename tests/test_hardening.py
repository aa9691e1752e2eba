"""Hardening: non-finite weights and scores never become labels (library, engine, server), and a
failed chunk's error reaches its own caller only."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import websockets
from safetensors.torch import load_file, save_file

from qguard_stream import CheckpointError, NonFiniteScoresError, StreamGuard
from qguard_stream.checkpoints import make_random_checkpoint
from qguard_stream.conversation import plan_conversation
from qguard_stream.engine import Engine, EngineSettings
from qguard_stream.kvcache.paged import BlockTable
from qguard_stream.runtime.outputs import GuardScores
from qguard_stream.runtime.paged import Chunk
from qguard_stream.server.protocol import ServerLimits
from qguard_stream.verdicts import build_verdicts
from tests.test_server import AUTH, LiveServer

NAN_TOKEN = 7  # its embedding row is NaN: any session fed it scores NaN, the others do not
GOOD = [11, 12, 13]


def poisoned_checkpoint(directory: Path, name: str, index: tuple[int, ...]) -> Path:
    """The tiny checkpoint with one NaN written into tensor `name` at `index`."""
    path = make_random_checkpoint(directory, "tiny", seed=1)
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name][index] = float("nan")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def nan_embedding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return poisoned_checkpoint(tmp_path_factory.mktemp("nan"), "model.embed_tokens.weight",
                               (NAN_TOKEN, 3))


@pytest.fixture(scope="module")
def nan_guard(nan_embedding: Path) -> StreamGuard:
    return StreamGuard.from_pretrained(nan_embedding, device="cpu", check_finite=False)


def strict_json(text: str) -> dict:
    """json.loads refusing the bare NaN / Infinity Python's json accepts."""
    def refuse(constant: str) -> None:
        raise ValueError(f"invalid JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("name,index", [("model.embed_tokens.weight", (NAN_TOKEN, 3)),
                                        ("model.layers.1.mlp.down_proj.weight", (0, 0)),
                                        ("risk_level_head.weight", (1, 2))])
def test_a_non_finite_weight_is_refused_at_load_naming_the_tensor(
        tmp_path: Path, name: str, index: tuple[int, ...]) -> None:
    path = poisoned_checkpoint(tmp_path, name, index)
    with pytest.raises(CheckpointError, match=f"{name}.*1 non-finite.*check_finite=False"):
        StreamGuard.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("fast_path", [True, False])
def test_non_finite_scores_raise_instead_of_becoming_safe(nan_embedding: Path,
                                                          fast_path: bool) -> None:
    guard = StreamGuard.from_pretrained(nan_embedding, device="cpu", check_finite=False,
                                        fast_path=fast_path)
    state = guard.open_stream()
    guard.moderate(state, GOOD, "user")
    for ids in ([NAN_TOKEN], [14, NAN_TOKEN, 15]):
        with pytest.raises(NonFiniteScoresError, match="non-finite assistant probabilities"):
            guard.moderate(state, ids, "assistant")
        assert state.token_ids == GOOD  # the session is as it was before the call
    # the token after the good prefix still scores as in a fresh session
    verdicts = guard.moderate(state, [16], "assistant")
    fresh = guard.open_stream()
    guard.moderate(fresh, [*GOOD, 16], "assistant")
    torch.testing.assert_close(verdicts.risk_probs, fresh.last_verdicts.risk_probs[-1:],
                               atol=1e-5, rtol=0)
    guard.close_stream(state)
    guard.close_stream(fresh)


def test_an_engine_step_fails_only_the_chunk_that_went_non_finite(nan_guard: StreamGuard
                                                                  ) -> None:
    engine = Engine(nan_guard, EngineSettings(max_tokens=512))
    bad, good = engine.open(), engine.open()
    engine.moderate_many([(bad, GOOD, "user"), (good, GOOD, "user")])
    bad_future = engine.submit(bad, [NAN_TOKEN], "assistant")
    good_future = engine.submit(good, [14], "assistant")
    assert engine.step() == 2  # one step scored both; it does not raise to this caller
    with pytest.raises(NonFiniteScoresError):
        bad_future.result(timeout=0)
    assert good_future.result(timeout=0).token_ids == (14,)
    assert bad.token_ids == GOOD and good.token_ids == [*GOOD, 14]
    assert engine.moderate(bad, [14], "assistant").positions == range(3, 4)
    engine.close(bad)
    engine.close(good)
    assert engine.pool.used_blocks == 0


def test_a_step_checks_its_probabilities_once_and_flags_every_chunk(tiny_guard: StreamGuard
                                                                    ) -> None:
    """GuardScores finds a whole step finite with one reduction and says so on each chunk's
    Probs (which still unpacks as a pair); one NaN anywhere clears the flag for every chunk, so
    each chunk is then checked on its own and only the bad one fails."""
    heads = {"user": tiny_guard.model.query, "assistant": tiny_guard.model.response}
    output = GuardScores(heads)
    table = BlockTable(16)
    chunks = [Chunk(table, 0, torch.tensor([1, 2]), "user"),
              Chunk(table, 0, torch.tensor([3]), "assistant")]
    out = torch.rand(4, output.width)
    first, second = output.split(out, chunks)
    assert first.finite and second.finite
    risk, category = second
    assert torch.equal(risk, out[2:3, :output.num_risk])
    assert category.shape == (1, output.categories["assistant"])
    hidden = torch.randn(3, tiny_guard.config.hidden_size)
    assert all(probs.finite for probs in output.on_host(hidden, chunks))
    out[1, 0] = float("nan")
    assert not any(probs.finite for probs in output.split(out, chunks))
    hidden[2, 0] = float("nan")
    flagged = output.on_host(hidden, chunks)
    assert not any(probs.finite for probs in flagged)
    config = tiny_guard.config
    build_verdicts(config, "user", 0, torch.tensor([1, 2]), *flagged[0])  # finite rows: fine
    with pytest.raises(NonFiniteScoresError, match=r"positions \[0\]"):
        build_verdicts(config, "assistant", 0, torch.tensor([3]), *flagged[1])


def test_each_draining_thread_gets_its_own_outcome(nan_guard: StreamGuard) -> None:
    """Callers on two threads share steps: the one whose chunk failed gets the error, the other
    its verdicts (a failed step used to raise in whichever thread was draining)."""
    engine = Engine(nan_guard, EngineSettings(max_tokens=4096))
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def caller(name: str, token: int) -> None:
        session = engine.open()
        engine.moderate(session, GOOD, "user")
        barrier.wait(timeout=30)
        try:
            for _ in range(20):
                outcomes[name] = engine.moderate(session, [token], "assistant")
        except Exception as error:
            outcomes[name] = error
        finally:
            engine.close(session)

    threads = [threading.Thread(target=caller, args=("bad", NAN_TOKEN)),
               threading.Thread(target=caller, args=("good", 14))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(outcomes["bad"], NonFiniteScoresError)
    assert not isinstance(outcomes["good"], Exception), outcomes["good"]
    assert engine.pool.used_blocks == 0


@pytest.fixture(scope="module")
def nan_server(nan_guard: StreamGuard) -> Iterator[LiveServer]:
    server = LiveServer(Engine(nan_guard, EngineSettings(block_size=8, max_tokens=4096)))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_the_server_answers_non_finite_scores_with_an_error_frame(nan_server: LiveServer
                                                                  ) -> None:
    async def run() -> tuple[dict, dict, dict]:
        async with websockets.connect(nan_server.ws, additional_headers=AUTH) as ws:
            async def ask(frame: dict) -> dict:
                await ws.send(json.dumps(frame))
                return strict_json(await asyncio.wait_for(ws.recv(), timeout=30))

            opened = await ask({"type": "open", "token_ids": GOOD})
            session = opened["session"]
            failed = await ask({"type": "feed", "session": session, "token_ids": [NAN_TOKEN],
                                "role": "assistant", "id": 5})
            after = await ask({"type": "feed", "session": session, "token_ids": [14],
                               "role": "assistant"})
            return opened, failed, after

    _, failed, after = asyncio.run(run())
    assert failed["type"] == "error" and failed["code"] == "model_error"
    assert "non-finite" in failed["error"] and failed["id"] == 5
    assert after["type"] == "verdicts" and after["start"] == len(GOOD)  # session kept


def test_post_moderate_answers_500_naming_the_cause(nan_server: LiveServer,
                                                    nan_guard: StreamGuard) -> None:
    messages = [{"role": "user", "content": "("}]  # templated, "(" stays token 7
    assert NAN_TOKEN in plan_conversation(nan_guard.tokenizer, messages, False).prompt_ids
    reply = httpx.post(f"{nan_server.http}/v1/moderate", headers=AUTH, timeout=30,
                       json={"messages": messages})
    assert reply.status_code == 500
    body = strict_json(reply.text)
    assert body["code"] == "model_error" and "non-finite" in body["error"]


# ---- limits: nesting, sizes, held-back text, nobody stalls the others ----------------------------
@pytest.fixture(scope="module")
def limited(tiny_guard: StreamGuard) -> Iterator[LiveServer]:
    limits = ServerLimits(max_frame_bytes=300_000, max_feed_text_chars=200_000,
                          max_feed_tokens=2000, max_pending_chars=1000)
    server = LiveServer(Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=8192)),
                        limits=limits)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def post(server: LiveServer, content: bytes | str, content_type: str = "application/json"
         ) -> httpx.Response:
    return httpx.post(f"{server.http}/v1/moderate", content=content, timeout=60,
                      headers={**AUTH, "Content-Type": content_type})


def test_deeply_nested_json_is_an_error_frame_and_the_connection_lives(limited: LiveServer
                                                                       ) -> None:
    nested = "[" * 1000 + "]" * 1000  # 2 KB, 1,000 deep

    async def run() -> tuple[dict, dict, dict]:
        async with websockets.connect(limited.ws, additional_headers=AUTH) as ws:
            async def ask(frame: str) -> dict:
                await ws.send(frame)
                return strict_json(await asyncio.wait_for(ws.recv(), timeout=30))

            opened = await ask(json.dumps({"type": "open", "token_ids": GOOD}))
            refused = await ask(nested)
            fed = await ask(json.dumps({"type": "feed", "token_ids": [14]}))
            return opened, refused, fed

    _, refused, fed = asyncio.run(run())
    assert refused["code"] == "bad_request" and "1000 levels" in refused["error"]
    assert fed["type"] == "verdicts" and fed["start"] == len(GOOD)  # the session survived
    reply = post(limited, '{"messages": ' + nested + "}")
    assert reply.status_code == 400 and "levels" in reply.json()["error"]


def test_http_refuses_other_media_types_and_oversized_bodies(limited: LiveServer) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    assert post(limited, body).status_code == 200
    assert post(limited, body, "text/plain").status_code == 415
    big = post(limited, json.dumps({"messages": [{"role": "user", "content": "x" * 400_000}]}))
    assert big.status_code == 413 and big.json()["code"] == "too_large"
    many = post(limited, json.dumps({"messages": [{"role": "user", "content": "ab " * 60_000}]}))
    assert many.status_code == 413 and "max_feed_tokens" in many.json()["error"]


def test_feeds_past_the_limits_are_refused_and_change_nothing(limited: LiveServer) -> None:
    async def run() -> list[dict]:
        async with websockets.connect(limited.ws, additional_headers=AUTH,
                                      max_size=2**24) as ws:
            async def ask(frame: dict | str) -> dict:
                await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
                return strict_json(await asyncio.wait_for(ws.recv(), timeout=60))

            replies = [await ask({"type": "open", "token_ids": GOOD})]
            replies.append(await ask("x" * 400_000))  # frame bytes
            replies.append(await ask({"type": "feed", "token_ids": [1] * 2001}))  # tokens
            replies.append(await ask({"type": "feed", "text": "y" * 200_001}))  # text chars
            replies.append(await ask({"type": "feed", "text": "Hello "}))
            # one unfinished word grows past the held-back bound: refused, nothing kept
            replies.append(await ask({"type": "feed", "text": "z" * 600}))
            replies.append(await ask({"type": "feed", "text": "z" * 600}))
            replies.append(await ask({"type": "feed", "text": " end", "final": True}))
            return replies

    replies = asyncio.run(run())
    assert [r.get("code") for r in replies[1:4]] == ["too_large"] * 3
    assert "max_frame_bytes" in replies[1]["error"]
    assert "max_feed_tokens" in replies[2]["error"]
    assert "max_feed_text_chars" in replies[3]["error"]
    assert replies[5]["type"] == "verdicts" and replies[5]["pending_text"].endswith("z" * 600)
    assert replies[6]["code"] == "too_large" and "max_pending_chars" in replies[6]["error"]
    final = replies[7]
    assert final["type"] == "verdicts" and final["pending_text"] == ""
    # what was scored: GOOD, then "Hello " + "z" * 600 + " end" (the refused delta is gone)
    expected_ids = GOOD + limited.engine.guard.tokenizer(
        "Hello " + "z" * 600 + " end", add_special_tokens=False)["input_ids"]
    assert final["length"] == len(expected_ids)


def test_a_large_request_does_not_stall_another_connection(limited: LiveServer) -> None:
    """While one connection's 190 KB text frame is parsed and tokenized (in a worker thread),
    another connection's small request is answered first."""
    order: list[str] = []
    done: dict[str, float] = {}

    async def big() -> None:
        async with websockets.connect(limited.ws, additional_headers=AUTH) as ws:
            await ws.send(json.dumps({"type": "open", "token_ids": GOOD}))
            await ws.recv()
            words = " ".join(f"w{i % 997}" for i in range(40_000))[:190_000]
            await ws.send(json.dumps({"type": "feed", "text": words, "final": True}))
            await asyncio.sleep(0.1)
            ready.set()
            reply = await asyncio.wait_for(ws.recv(), timeout=120)
            order.append("big")
            done["big"] = time.perf_counter() - began
            done["big_code"] = json.loads(reply).get("code")

    async def small() -> None:
        async with websockets.connect(limited.ws, additional_headers=AUTH) as ws:
            await ready.wait()
            await ws.send(json.dumps({"type": "open", "token_ids": [1, 2]}))
            await asyncio.wait_for(ws.recv(), timeout=120)
            order.append("small")
            done["small"] = time.perf_counter() - began

    async def run() -> None:
        await asyncio.gather(big(), small())

    ready = asyncio.Event()
    began = time.perf_counter()
    asyncio.run(run())
    assert order == ["small", "big"], done  # seconds from the start, and the big reply's code


def test_docs_are_closed_behind_an_api_key_unless_opened(limited: LiveServer,
                                                         tiny_guard: StreamGuard) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{limited.http}{path}", timeout=10).status_code == 404
    opened = LiveServer(Engine(tiny_guard, EngineSettings(max_tokens=256)), open_docs=True)
    opened.start()
    try:
        assert httpx.get(f"{opened.http}/openapi.json", timeout=10).status_code == 200
    finally:
        opened.stop()


def test_server_rollback_says_which_held_back_text_it_dropped(limited: LiveServer) -> None:
    async def run() -> dict:
        async with websockets.connect(limited.ws, additional_headers=AUTH) as ws:
            async def ask(frame: dict) -> dict:
                await ws.send(json.dumps(frame))
                return strict_json(await asyncio.wait_for(ws.recv(), timeout=30))

            await ask({"type": "open", "token_ids": GOOD})
            fed = await ask({"type": "feed", "text": "Hello wor"})
            assert fed["pending_text"] == " wor"
            return await ask({"type": "rollback", "length": len(GOOD)})

    reply = asyncio.run(run())
    assert reply["type"] == "rolled_back" and reply["dropped_text"] == " wor"


def test_an_unexpected_failure_is_an_error_frame_not_a_closed_socket(
        limited: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RuntimeError in the step (as a CUDA out-of-memory would raise; injected here, the CPU
    cannot produce one) used to close the socket without a word; now it is an error frame with
    a code, and the session and connection carry on."""
    runner = limited.engine.runner
    real_forward = runner.forward

    async def run() -> tuple[dict, dict]:
        async with websockets.connect(limited.ws, additional_headers=AUTH) as ws:
            async def ask(frame: dict) -> dict:
                await ws.send(json.dumps(frame))
                return strict_json(await asyncio.wait_for(ws.recv(), timeout=30))

            await ask({"type": "open", "token_ids": GOOD})
            monkeypatch.setattr(runner, "forward", out_of_memory)
            failed = await ask({"type": "feed", "token_ids": [14]})
            monkeypatch.setattr(runner, "forward", real_forward)
            return failed, await ask({"type": "feed", "token_ids": [14]})

    def out_of_memory(chunks):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    failed, after = asyncio.run(run())
    assert failed["type"] == "error" and failed["code"] == "internal"
    assert "CUDA out of memory" in failed["error"]
    assert after["type"] == "verdicts" and after["start"] == len(GOOD)


def test_moderate_many_scored_at_once_keeps_the_queued_paths_promises(nan_guard: StreamGuard
                                                                      ) -> None:
    """moderate_many with nothing queued scores in the caller: a chunk that goes non-finite
    leaves only its session as it was (the others are recorded, then it raises); a refused
    chunk stops the list after the chunks before it are scored; past the token budget the
    chunks take several steps; every verdict equals the queued path's."""
    settings = EngineSettings(max_tokens=512, max_batch_tokens=4)
    now, queued = Engine(nan_guard, settings), Engine(nan_guard, settings)
    now.submit = lambda *args, **kwargs: pytest.fail("queued a chunk")  # the direct path only
    bad, good, other = now.open(), now.open(), now.open()
    with pytest.raises(NonFiniteScoresError):
        now.moderate_many([(good, GOOD, "user"), (bad, [*GOOD[:2], NAN_TOKEN], "user"),
                           (other, GOOD[:1], "user")])
    assert good.token_ids == GOOD and bad.token_ids == [] and other.token_ids == GOOD[:1]
    assert now.stats().steps == 2  # budget 4: [3 tokens], then [3 + 1]
    assert now.pool.used_blocks == 2  # the bad session's reservation went back
    with pytest.raises(ValueError, match="out of range"):
        now.moderate_many([(bad, [14], "user"), (good, [10**9], "assistant"),
                           (other, [15], "user")])
    assert bad.token_ids == [14] and good.token_ids == GOOD and other.token_ids == GOOD[:1]
    queued.step_listeners.append(lambda stats: None)  # a listener turns the direct path off

    def fresh_chunks(engine: Engine) -> list:
        return [(engine.open(), [*GOOD, 14], "user"), (engine.open(), [15, 16], "assistant")]

    for got, expected in zip(now.moderate_many(fresh_chunks(now)),
                             queued.moderate_many(fresh_chunks(queued))):
        assert got.token_ids == expected.token_ids
        torch.testing.assert_close(got.risk_probs, expected.risk_probs, atol=1e-6, rtol=0)
