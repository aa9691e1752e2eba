"""A property test of the WebSocket protocol (hypothesis): random sequences of valid and invalid
frames over several connections to one real server. After every frame, each reply is checked
against a single-session reference (StreamGuard, the session's history scored in one session),
errors must be error frames, and the pool must hold exactly the blocks the open sessions need."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from qguard_stream import StreamGuard
from qguard_stream.engine import Engine, EngineSettings
from tests.test_server import API_KEY, LiveServer

from oracles import score_in_one_session

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BLOCK = 8
CONNECTIONS = 3
VOCAB = 151936

ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
garbage = st.sampled_from([
    "not json", "[1, 2]", "[" * 200 + "]" * 200, '{"type": "dance"}', '{"type": "feed"}',
    '{"type": "feed", "token_ids": [-1]}', '{"type": "feed", "token_ids": [151936]}',
    '{"type": "feed", "token_ids": []}', '{"type": "rollback"}', '{"type": "close", "session": 99}',
    '{"type": "open", "token_ids": [1], "role": "robot"}', '{"type": "feed", "text": 5}',
])
action = st.one_of(
    st.tuples(st.just("open"), st.integers(0, CONNECTIONS - 1), ids, st.sampled_from(
        ["user", "assistant"])),
    st.tuples(st.just("feed"), st.integers(0, CONNECTIONS - 1), ids, st.sampled_from(
        ["user", "assistant"]), st.integers(0, 3)),
    st.tuples(st.just("rollback"), st.integers(0, CONNECTIONS - 1), st.integers(-2, 40),
              st.integers(0, 3)),
    st.tuples(st.just("close"), st.integers(0, CONNECTIONS - 1), st.integers(0, 3)),
    st.tuples(st.just("garbage"), st.integers(0, CONNECTIONS - 1), garbage),
)


@pytest.fixture(scope="module")
def server(tiny_guard: StreamGuard) -> Iterator[LiveServer]:
    live = LiveServer(Engine(tiny_guard, EngineSettings(block_size=BLOCK, max_tokens=4096)))
    live.start()
    try:
        yield live
    finally:
        live.stop()


class Model:
    """What the server should hold: per connection, session id -> [(ids, role), ...]."""

    def __init__(self) -> None:
        self.sessions: list[dict[int, list[tuple[list[int], str]]]] = [
            {} for _ in range(CONNECTIONS)]

    def pick(self, conn: int, index: int) -> int | None:
        open_ids = sorted(self.sessions[conn])
        return open_ids[index % len(open_ids)] if open_ids else None

    def blocks(self) -> int:
        return sum(math.ceil(sum(len(i) for i, _ in history) / BLOCK)
                   for conn in self.sessions for history in conn.values())


def truncate(history: list[tuple[list[int], str]], length: int) -> list[tuple[list[int], str]]:
    kept, total = [], 0
    for chunk, role in history:
        take = chunk[:max(0, length - total)]
        if take:
            kept.append((take, role))
        total += len(chunk)
    return kept


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(action, min_size=1, max_size=14))
def test_random_frames_keep_every_session_equal_to_its_reference(
        server: LiveServer, tiny_guard: StreamGuard, actions: list[tuple]) -> None:
    model = Model()
    with ExitStack() as stack:
        sockets = [stack.enter_context(connect(server.ws, additional_headers=AUTH))
                   for _ in range(CONNECTIONS)]
        run_actions(server, tiny_guard, actions, model, sockets)
    for _ in range(200):  # closed connections free their sessions
        if server.engine.pool.used_blocks == 0:
            break
        time.sleep(0.05)
    assert server.engine.pool.used_blocks == 0


def run_actions(server: LiveServer, tiny_guard: StreamGuard, actions: list[tuple], model: Model,
                sockets: list) -> None:
    def ask(conn: int, frame: dict | str) -> dict:
        sockets[conn].send(frame if isinstance(frame, str) else json.dumps(frame))
        return json.loads(sockets[conn].recv(timeout=60))

    for step in actions:
        kind, conn = step[0], step[1]
        if kind == "open":
            _, _, chunk, role = step
            reply = ask(conn, {"type": "open", "token_ids": chunk, "role": role})
            assert reply["type"] == "opened", reply
            model.sessions[conn][reply["session"]] = [(chunk, role)]
            expected = score_in_one_session(tiny_guard, [(chunk, role)])[-1]
            assert reply["verdict"]["risk_level"] == expected.risk_level[-1]
        elif kind == "feed":
            _, _, chunk, role, index = step
            session = model.pick(conn, index)
            reply = ask(conn, {"type": "feed", "session": session if session else 77,
                               "token_ids": chunk, "role": role})
            if session is None:
                assert reply["type"] == "error" and reply["code"] == "session_unknown"
                continue
            history = model.sessions[conn][session]
            history.append((chunk, role))
            expected = score_in_one_session(tiny_guard, history)[-1]
            assert reply["type"] == "verdicts", reply
            assert reply["token_ids"] == chunk and reply["start"] == expected.positions.start
            assert reply["risk_level"] == expected.risk_level
            assert reply["risk_prob"] == pytest.approx(expected.risk_prob, abs=1e-4)
        elif kind == "rollback":
            _, _, length, index = step
            session = model.pick(conn, index)
            if session is None:
                continue
            history = model.sessions[conn][session]
            held = sum(len(c) for c, _ in history)
            reply = ask(conn, {"type": "rollback", "session": session, "length": length})
            if 0 <= length <= held:
                assert reply["type"] == "rolled_back", reply
                model.sessions[conn][session] = truncate(history, length)
            else:
                assert reply["type"] == "error" and reply["code"] == "bad_request", reply
        elif kind == "close":
            _, _, index = step
            session = model.pick(conn, index)
            if session is None:
                continue
            assert ask(conn, {"type": "close", "session": session})["type"] == "closed"
            del model.sessions[conn][session]
        else:
            reply = ask(conn, step[2])
            assert reply["type"] == "error" and reply["code"] in (
                "bad_request", "too_large", "session_unknown"), reply
        assert server.engine.pool.used_blocks == model.blocks()
