"""Sessions that survive their server: qguard_stream.client's SessionClient keeps each session's
history and re-opens it when the server loses it (a restart, an expired TTL), over WebSocket and
over the HTTP session API, against real servers on loopback. Every reply after a resume must equal
the reply of the same call on a server that never lost the session; a server still holding an old
copy of a session (its key moved to another server and back) must not answer from it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.fake_upstream import Loopback
from qguard_stream import StreamGuard
from qguard_stream.client import AsyncSession, AsyncSessionClient, HttpTransport, SessionClient
from qguard_stream.engine import Engine, EngineSettings
from qguard_stream.server import create_app

from oracles import PROMPT, expected_replies, run, same, script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def serve(checkpoint: Path, port: int = 0, ttl: float | None = 600.0) -> Loopback:
    engine = Engine(StreamGuard.from_pretrained(checkpoint, device="cpu"),
                    EngineSettings(max_tokens=8192))
    served = Loopback(create_app(engine, session_ttl_s=ttl), port=port)
    served.engine = engine
    return served


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Iterator[Loopback]:
    served = serve(tiny_checkpoint)
    yield served
    served.stop()


@pytest.mark.parametrize("transport", ["websocket", "http"])
def test_a_session_resumes_on_a_restarted_server(tiny_checkpoint, reference, transport) -> None:
    expected = expected_replies(reference, transport)
    server = serve(tiny_checkpoint)
    port = int(server.url.rsplit(":", 1)[1])
    with SessionClient(server.url, transport=transport) as client:
        session = client.open(messages=PROMPT, holdback=2)
        for index, step in enumerate(script()):
            if index in (4, 11):  # the server dies and comes back empty, twice
                server.stop()
                server = serve(tiny_checkpoint, port=port)
            same(run(session, step), expected[index])
        assert session.resumes == 2
        session.close()
    server.stop()


def test_idle_sessions_expire_and_resume(tiny_checkpoint, reference) -> None:
    expected = expected_replies(reference, "http")
    server = serve(tiny_checkpoint, ttl=0.4)
    try:
        with SessionClient(server.url, transport="http") as client:
            session = client.open(messages=PROMPT, holdback=2)
            steps = script()
            same(run(session, steps[0]), expected[0])
            for _ in range(100):  # the sweep runs every ttl / 4
                if server.engine.stats().active_sessions == 0:
                    break
                time.sleep(0.05)
            assert server.engine.pool.used_blocks == 0  # expired: its blocks are free
            for index, step in enumerate(steps[1:], 1):
                same(run(session, step), expected[index])
            assert session.resumes == 1
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
            assert "qguard_sessions_expired_total 1.0" in metrics
    finally:
        server.stop()


def test_http_sessions_and_the_websocket_give_identical_verdicts(reference) -> None:
    for websocket, http in zip(expected_replies(reference, "websocket"),
                               expected_replies(reference, "http")):
        same(http, websocket)


def test_http_session_errors_are_typed(reference) -> None:
    url = f"{reference.url}/v1/sessions"
    missing = httpx.post(url, json={}, timeout=10)
    assert missing.status_code == 400 and "x-session-id" in missing.json()["error"]
    unknown = httpx.post(f"{url}/nope/feed", json={"text": "x"}, timeout=10,
                         headers={"x-session-id": "nope"})
    assert unknown.status_code == 404 and unknown.json()["code"] == "session_unknown"
    headers = {"x-session-id": "s1"}
    assert httpx.post(url, json={"token_ids": [1, 2]}, headers=headers,
                      timeout=10).status_code == 200
    twice = httpx.post(url, json={"token_ids": [1, 2]}, headers=headers, timeout=10)
    assert twice.status_code == 409 and twice.json()["code"] == "session_exists"
    bad = httpx.post(f"{url}/s1/feed", json={"token_ids": [-1]}, headers=headers, timeout=10)
    assert bad.status_code == 400 and bad.json()["code"] == "bad_request"
    stale = httpx.post(url, json={"token_ids": [1, 2]}, headers={"x-session-id": "s3"},
                       timeout=10).json()["revision"]
    fed = httpx.post(f"{url}/s3/feed", json={"token_ids": [3]}, timeout=10,
                     headers={"x-session-id": "s3", "x-session-revision": stale})
    assert fed.status_code == 200 and fed.json()["revision"] != stale
    old = httpx.post(f"{url}/s3/feed", json={"token_ids": [4]}, timeout=10,
                     headers={"x-session-id": "s3", "x-session-revision": stale})
    assert old.status_code == 404 and old.json()["code"] == "session_unknown"
    assert "revision" in old.json()["error"]
    gone = httpx.post(f"{url}/s3/feed", json={"token_ids": [4]}, timeout=10,
                      headers={"x-session-id": "s3"})
    assert gone.status_code == 404  # the stale copy was closed
    spans = httpx.post(url, headers={"x-session-id": "s2"}, timeout=10, json={
        "spans": [{"token_ids": [1, 2], "role": "user"}], "judge_from": 3})
    assert spans.status_code == 400 and "judge_from" in spans.json()["error"]
    assert httpx.delete(f"{url}/s1", headers=headers, timeout=10).json()["type"] == "closed"
    assert httpx.delete(f"{url}/s1", headers=headers, timeout=10).status_code == 404


async def run_async(session: AsyncSession, step: tuple[str, object]) -> dict:
    """oracles.run for an AsyncSession."""
    kind, value = step
    if kind == "rollback":
        return await session.rollback(session.length + value)
    if kind == "ids":
        return await session.feed(token_ids=value)
    return await session.feed(text=value, final=kind == "final")


def route(client: AsyncSessionClient, server: Loopback) -> None:
    """Send the client's next HTTP calls to `server`, as a router does when a session's key
    moves to another replica."""
    assert isinstance(client.transport, HttpTransport)
    client.transport.base = server.url


async def test_a_session_moved_away_and_back_is_not_answered_from_the_old_copy(
        tiny_checkpoint, reference) -> None:
    expected = expected_replies(reference, "http")
    first, second = serve(tiny_checkpoint), serve(tiny_checkpoint)
    try:
        async with AsyncSessionClient(first.url, transport="http") as client:
            session = await client.open(messages=PROMPT, holdback=2)
            for index, step in enumerate(script()):
                if index == 4:  # a replica is added: the key moves to it
                    route(client, second)
                if index == 9:  # and removed: back to the first, which kept its old copy
                    route(client, first)
                same(await run_async(session, step), expected[index])
            assert session.resumes == 2
            await session.close()
        assert first.engine.stats().active_sessions == 0  # its stale copy was closed
        assert second.engine.stats().active_sessions == 1  # the copy left there: to its TTL
    finally:
        first.stop()
        second.stop()


async def test_an_old_copy_of_the_same_length_is_stale_too(tiny_checkpoint, reference) -> None:
    """Rolled back and refed elsewhere to the length the old copy has: only the revision tells
    the copies apart."""
    calls = [("ids", [11, 12, 13]), ("rollback", -3), ("ids", [21, 22, 23]), ("ids", [31])]
    async with AsyncSessionClient(reference.url, transport="http") as client:
        session = await client.open(messages=PROMPT)
        expected = [await run_async(session, call) for call in calls]
        await session.close()
    first, second = serve(tiny_checkpoint), serve(tiny_checkpoint)
    try:
        async with AsyncSessionClient(first.url, transport="http") as client:
            session = await client.open(messages=PROMPT)
            same(await run_async(session, calls[0]), expected[0])
            route(client, second)
            for index in (1, 2):
                same(await run_async(session, calls[index]), expected[index])
            route(client, first)  # holds [.. 11 12 13]: as long as [.. 21 22 23]
            same(await run_async(session, calls[3]), expected[3])
            assert session.resumes == 2
            await session.close()
    finally:
        first.stop()
        second.stop()
