"""qguard_stream.client against a real `qguard-stream serve` app on loopback (and the same
protocol in-process), and the server's held-back text release for text feeds. The guard is a
trigger checkpoint: Unsafe exactly at " bomb" and " fuse", so what is released is known by hand."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from benchmarks.fake_upstream import Loopback
from qguard_stream import StreamGuard
from qguard_stream.checkpoints import make_trigger_checkpoint
from qguard_stream.client import (
    AsyncGuardClient,
    AsyncSessionClient,
    GuardServerError,
    GuardUnavailableError,
    stream_url,
)
from qguard_stream.engine import AsyncEngine, Engine, EngineSettings
from qguard_stream.integrations.retokenize import HeldText, TokenText
from qguard_stream.server import create_app

from oracles import same

BOMB, FUSE = 12764, 31702
FLAGGED = "Mix flour and water. Light the bomb fuse now, then run."
SAFE_PREFIX = "Mix flour and water. Light the"
PROMPT = [{"role": "user", "content": "How do I bake bread?"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    path = make_trigger_checkpoint(tmp_path_factory.mktemp("trigger"), [BOMB, FUSE])
    return Engine(StreamGuard.from_pretrained(path, device="cpu"), EngineSettings())


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[Loopback]:
    served = Loopback(create_app(engine, api_key="k"))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def forgetful(engine: Engine) -> Iterator[Loopback]:
    """The same guard, closing sessions idle for a second."""
    served = Loopback(create_app(engine, api_key="k", session_ttl_s=1.0))
    yield served
    served.stop()


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


async def released_text(client: AsyncGuardClient, text: str, size: int, **options
                        ) -> tuple[str, list[dict]]:
    opened = await client.open(messages=PROMPT, **options)
    out, replies = [], []
    for delta in pieces(text, size):
        replies.append(await client.feed(opened["session"], text=delta))
        out.append(replies[-1]["released"])
    replies.append(await client.feed(opened["session"], text="", final=True))
    out.append(replies[-1]["released"])
    return "".join(out), replies


def test_stream_url_forms() -> None:
    assert stream_url("http://h:1") == "ws://h:1/v1/stream"
    assert stream_url("https://h:1/") == "wss://h:1/v1/stream"
    assert stream_url("ws://h:1/v1/stream") == "ws://h:1/v1/stream"
    assert stream_url("h:1") == "ws://h:1/v1/stream"
    with pytest.raises(ValueError, match="ftp://h"):
        stream_url("ftp://h")


@pytest.mark.parametrize("size", [1, 5, 200])
def test_released_text_withholds_the_flagged_run_over_the_websocket(server, size) -> None:
    async def run() -> tuple[str, list[dict], str]:
        async with await AsyncGuardClient.connect(server.url, api_key="k") as client:
            released, replies = await released_text(client, FLAGGED, size, holdback=2)
            clean, _ = await released_text(client, "Knead the dough, then bake it.", size,
                                           holdback=2)
        return released, replies, clean

    released, replies, clean = asyncio.run(run())
    assert released == SAFE_PREFIX  # " bomb fuse now, then run." is never released
    flags = [flag for reply in replies for flag in reply["flags"]]
    assert [flag["stop"] for flag in flags] == [True]
    assert clean == "Knead the dough, then bake it."  # everything, once final


def test_holdback_delays_release_by_that_many_tokens(server) -> None:
    async def released(holdback: int) -> list[str]:
        async with await AsyncGuardClient.connect(server.url, api_key="k") as client:
            opened = await client.open(messages=PROMPT, holdback=holdback)
            return [(await client.feed(opened["session"], text=text))["released"]
                    for text in (" a", " b", " c")]

    # text " a b c" tokenizes as " a", " b", " c"; the last piece waits for more text (it may
    # still grow), so after three feeds two tokens are scored
    assert asyncio.run(released(0)) == ["", " a", " b"]
    assert asyncio.run(released(1)) == ["", "", " a"]
    assert asyncio.run(released(2)) == ["", "", ""]


def test_errors_are_typed_and_the_session_survives(server) -> None:
    async def run() -> dict:
        async with await AsyncGuardClient.connect(server.url, api_key="k") as client:
            with pytest.raises(GuardServerError, match="holdback") as error:
                await client.open(messages=PROMPT, holdback=65)
            assert error.value.code == "bad_request"
            with pytest.raises(GuardServerError, match="policy"):
                await client.open(messages=PROMPT, policy="lenient")
            opened = await client.open(messages=PROMPT, policy="threshold:0.5", holdback=1)
            first = await client.feed(opened["session"], text="Mix flour")
            assert first["token_ids"] and first["released"] == ""  # "Mix": one token, held
            with pytest.raises(GuardServerError, match="held back"):
                await client.feed(opened["session"], token_ids=[1, 2])
            return await client.feed(opened["session"], text=" now", final=True)

    reply = asyncio.run(run())
    assert reply["released"] == "Mix flour now"  # the refused frame lost nothing
    with pytest.raises(GuardUnavailableError, match="cannot reach"):
        asyncio.run(AsyncGuardClient.connect(f"ws://127.0.0.1:{closed_port()}", timeout=5))


def test_in_process_client_speaks_the_same_protocol(server, engine) -> None:
    async def run() -> tuple[str, str]:
        runtime = AsyncEngine(engine)
        try:
            local = AsyncGuardClient.in_process(runtime, engine.guard.tokenizer)
            async with local:
                here, _ = await released_text(local, FLAGGED, 3, holdback=2)
        finally:
            await runtime.aclose()
        async with await AsyncGuardClient.connect(server.url, api_key="k") as client:
            there, _ = await released_text(client, FLAGGED, 3, holdback=2)
        return here, there

    here, there = asyncio.run(run())
    assert here == there == SAFE_PREFIX
    assert engine.stats().active_sessions == 0


def test_prompt_verdict_says_whether_the_policy_flags_it(server, tmp_path) -> None:
    async def run() -> dict:
        async with await AsyncGuardClient.connect(server.url, api_key="k") as client:
            return (await client.open(messages=[{"role": "user",
                                                 "content": "Light the bomb fuse"}]))["prompt"]

    prompt = asyncio.run(run())  # the verdict is read at <|im_end|>, which is no trigger
    assert prompt["flagged"] is False and prompt["risk_level"] == "Safe"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FakeTokenizer:
    """Byte-level pieces for HeldText's hand-computed cases: id i is the byte string below."""

    def __init__(self) -> None:
        self.pieces = {1: "Hi", 2: "Ġthere", 3: "ĠâĤ", 4: "¬", 5: "!"}  # " €": ids 3 and 4
        self.added_tokens_decoder: dict = {}

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.pieces[token_id]


def test_held_text_releases_all_but_the_holdback_and_nothing_of_a_flagged_run() -> None:
    text = TokenText(FakeTokenizer())
    held = HeldText(text, holdback=2)
    held.add([1, 2, 3], end=13)  # positions 10, 11, 12
    assert held.release() == "Hi"
    held.add([4], end=14)
    assert held.release() == " there"
    assert held.release(final=True) == " €"  # the character split over two ids comes out whole
    flagged = HeldText(text, holdback=0)
    flagged.add([1, 2, 5], end=3)
    assert flagged.release(stop_start=1) == "Hi"  # the run starts at position 1: " there!" held
    flagged.add([1], end=4)
    assert flagged.release() == "" and flagged.release(final=True) == ""
    flagged.truncate(1)  # rolled back before the run: releasing resumes from there
    flagged.add([5], end=2)
    assert flagged.release() == "!"
    with pytest.raises(ValueError, match="holdback"):
        HeldText(text, holdback=-1)


async def resumable_replies(url: str, transport: str, engine: Engine | None = None
                            ) -> tuple[list[dict], int]:
    """Open, feed text, roll back, then (with `engine`: once the server has expired the
    session) finish the text; the replies and how many times the session was re-opened."""
    async with AsyncSessionClient(url, api_key="k", transport=transport) as client:
        session = await client.open(messages=PROMPT, holdback=2)
        replies = [session.opened, await session.feed(text="Mix flour and wa")]
        replies.append(await session.rollback(session.length - 1))
        if engine is not None:
            for _ in range(200):  # the TTL sweep closes it: the next call finds no session
                if engine.stats().active_sessions == 0:
                    break
                await asyncio.sleep(0.05)
            assert engine.stats().active_sessions == 0
        replies.append(await session.feed(text="ter. Light the bomb fuse now, then run.",
                                          final=True))
        replies.append(await session.feed(token_ids=[BOMB]))
        await session.close()
        return replies, session.resumes


@pytest.mark.parametrize("transport", ["http", "websocket"])
async def test_async_session_client_resumes_a_lost_session(server, forgetful, engine,
                                                           transport) -> None:
    expected, _ = await resumable_replies(server.url, transport)
    replies, resumes = await resumable_replies(forgetful.url, transport, engine)
    assert resumes >= 1
    assert replies[0]["prompt"] == expected[0]["prompt"]
    assert replies[2]["type"] == "rolled_back" and replies[2]["length"] == expected[2]["length"]
    for reply, reference in zip(replies[1:], expected[1:]):
        same(reply, reference)
    assert "bomb" not in "".join(reply.get("released", "") for reply in replies)
    assert [flag["stop"] for reply in replies for flag in reply.get("flags", [])] == [True]
