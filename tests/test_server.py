"""Server: a real uvicorn on 127.0.0.1 (ephemeral port, background thread), real WebSocket and HTTP
clients; verdicts checked against StreamGuard run directly."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
import websockets
from prometheus_client.parser import text_string_to_metric_families

from qguard_stream import Hooks, StreamGuard, attach
from qguard_stream.checkpoints import make_trigger_checkpoint
from qguard_stream.engine import Engine, EngineSettings
from qguard_stream.hooks import Monitor, token_verdicts
from qguard_stream.policy import ConsecutiveUnsafe, consecutive_unsafe, decision_json
from qguard_stream.server import create_app

from oracles import score_in_one_session as reference

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
VOCAB = 151936


class LiveServer:
    def __init__(self, engine: Engine, **app_options) -> None:
        self.engine = engine
        config = uvicorn.Config(create_app(engine, api_key=API_KEY, **app_options),
                                host="127.0.0.1", port=0, log_level="warning",
                                ws_ping_interval=None)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started, "uvicorn did not start within 30 s"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def live(tiny_guard: StreamGuard) -> Iterator[LiveServer]:
    engine = Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=16384))
    server = LiveServer(engine)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def metrics(live: LiveServer) -> dict[str, float]:
    text = httpx.get(f"{live.http}/metrics", headers=AUTH, timeout=10).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def wait_until_no_sessions(live: LiveServer) -> None:
    for _ in range(200):
        if live.engine.stats().active_sessions == 0:
            break
        time.sleep(0.05)
    assert live.engine.stats().active_sessions == 0
    assert live.engine.pool.used_blocks == 0


async def ask(ws, frame: dict) -> dict:
    await ws.send(json.dumps(frame))
    return json.loads(await asyncio.wait_for(ws.recv(), timeout=30))


def assert_reply_matches(reply: dict, expected) -> None:
    assert reply["type"] == "verdicts"
    assert reply["start"] == expected.positions.start
    assert reply["token_ids"] == list(expected.token_ids)
    assert reply["risk_level"] == expected.risk_level
    assert reply["category"] == expected.category
    assert reply["risk_prob"] == pytest.approx(expected.risk_prob, abs=1e-4)


# ---- streaming ---------------------------------------------------------------------------------
def client_script(seed: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(3, 20))]
    return prompt, [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))] for _ in range(4)]


async def stream_client(live: LiveServer, seed: int, expected: list) -> None:
    prompt, chunks = client_script(seed)
    async with websockets.connect(live.ws, additional_headers=AUTH, open_timeout=60) as ws:
        opened = await ask(ws, {"type": "open", "token_ids": prompt, "id": seed})
        assert opened["type"] == "opened" and opened["id"] == seed
        assert opened["length"] == len(prompt)
        assert opened["verdict"]["risk_level"] == expected[0].risk_level[-1]
        seen: list[tuple[int, str, str]] = []  # (position, level, category) of response tokens
        for chunk, want in zip(chunks, expected[1:]):
            reply = await ask(ws, {"type": "feed", "session": opened["session"],
                                   "token_ids": chunk})
            assert_reply_matches(reply, want)
            seen += zip(want.positions, want.risk_level, want.category)
            assert reply["decision"] == official_decision(seen)
        closed = await ask(ws, {"type": "close", "session": opened["session"]})
        assert closed == {"type": "closed", "session": opened["session"]}


def test_32_concurrent_sessions_match_reference(live: LiveServer,
                                                tiny_guard: StreamGuard) -> None:
    expected = {}
    for seed in range(32):  # computed before the clients start, not inside their event loop
        prompt, chunks = client_script(seed)
        expected[seed] = reference(tiny_guard,
                                   [(prompt, "user"), *[(c, "assistant") for c in chunks]])

    async def main() -> None:
        await asyncio.gather(*(stream_client(live, seed, expected[seed]) for seed in range(32)))

    asyncio.run(main())
    wait_until_no_sessions(live)
    assert metrics(live)["qguard_tokens_scored_total"] > 32 * 4


def test_open_with_messages_scores_prompt_like_the_template(live: LiveServer,
                                                            tiny_guard: StreamGuard) -> None:
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    rendered = tiny_guard.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, enable_thinking=False)
    rendered_ids = tiny_guard.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    prompt = rendered_ids[: rendered_ids.index(151645) + 1]  # through <|im_end|>
    header = tiny_guard.tokenizer("\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
                                  add_special_tokens=False)["input_ids"]
    text_ids = tiny_guard.tokenizer.encode(" Mix flour", add_special_tokens=False)
    expected = reference(tiny_guard, [(prompt, "user"), (header, "assistant"),
                                      (text_ids, "assistant")])

    async def main() -> None:
        async with websockets.connect(live.ws, additional_headers=AUTH, open_timeout=60) as ws:
            opened = await ask(ws, {"type": "open", "messages": messages})
            assert opened["length"] == len(prompt) + len(header)
            assert opened["prompt"]["position"] == len(prompt) - 1
            assert opened["prompt"]["risk_level"] == expected[0].risk_level[-1]
            reply = await ask(ws, {"type": "feed", "text": " Mix flour", "final": True})
            assert_reply_matches(reply, expected[2])
            assert reply["pending_text"] == ""

    asyncio.run(main())
    wait_until_no_sessions(live)


def test_text_deltas_split_anywhere_score_the_ids_of_the_whole_text(
        live: LiveServer, tiny_guard: StreamGuard) -> None:
    text = "Mix 200 g of flour, then knead it well. 🍞 Done!"
    deltas = ["Mi", "x 2", "00 g of fl", "our, then kn", "ead it well. \U0001f35e", " Do", "ne!"]
    assert "".join(deltas) == text
    whole = tiny_guard.tokenizer.encode(text, add_special_tokens=False)
    expected = reference(tiny_guard, [([11, 12], "user"), (whole, "assistant")])[1]

    async def main() -> None:
        async with websockets.connect(live.ws, additional_headers=AUTH, open_timeout=60) as ws:
            await ask(ws, {"type": "open", "token_ids": [11, 12]})
            replies = [await ask(ws, {"type": "feed", "text": delta}) for delta in deltas[:-1]]
            assert replies[0]["token_ids"] == [] and replies[0]["pending_text"] == "Mi"
            refused = await ask(ws, {"type": "feed", "token_ids": [5]})
            assert refused["type"] == "error" and "held back" in refused["error"]
            replies.append(await ask(ws, {"type": "feed", "text": deltas[-1], "final": True}))
            assert replies[-1]["pending_text"] == ""
            scored = [token for reply in replies for token in reply["token_ids"]]
            assert scored == whole
            levels = [level for reply in replies for level in reply["risk_level"]]
            assert levels == expected.risk_level

    asyncio.run(main())
    wait_until_no_sessions(live)


def test_rollback_over_websocket(live: LiveServer, tiny_guard: StreamGuard) -> None:
    prompt, first, second = [11, 12, 13, 14], [21, 22, 23], [31, 32]
    expected = reference(tiny_guard, [(prompt[:2], "user"), (second, "assistant")])

    async def main() -> None:
        async with websockets.connect(live.ws, additional_headers=AUTH, open_timeout=60) as ws:
            await ask(ws, {"type": "open", "token_ids": prompt})
            await ask(ws, {"type": "feed", "token_ids": first})
            rolled = await ask(ws, {"type": "rollback", "length": 2})
            assert rolled["type"] == "rolled_back" and rolled["length"] == 2
            assert rolled["decision"]["risk_level"] == "Safe"
            assert_reply_matches(await ask(ws, {"type": "feed", "token_ids": second}),
                                 expected[1])
            error = await ask(ws, {"type": "rollback", "length": 99})
            assert error["type"] == "error" and "99" in error["error"]

    asyncio.run(main())
    wait_until_no_sessions(live)


def test_malformed_frames_get_error_frames_and_sessions_keep_working(
        live: LiveServer, tiny_guard: StreamGuard) -> None:
    expected = reference(tiny_guard, [([5, 6, 7], "user"), ([8, 9], "assistant")])

    async def main() -> None:
        async with websockets.connect(live.ws, additional_headers=AUTH, open_timeout=60) as ws, \
                websockets.connect(live.ws, additional_headers=AUTH, open_timeout=60) as other:
            await ask(ws, {"type": "open", "token_ids": [5, 6, 7]})
            await ask(other, {"type": "open", "token_ids": [5, 6, 7]})
            bad_frames = [
                ("not json", "not valid JSON"),
                ("[1, 2]", "JSON object"),
                (json.dumps({"type": "explode"}), "'type' must be one of"),
                (json.dumps({"type": "feed", "token_ids": [1, VOCAB]}), f"token id {VOCAB}"),
                (json.dumps({"type": "feed", "token_ids": ["a"]}), "list of integers"),
                (json.dumps({"type": "feed", "session": 42, "token_ids": [1]}),
                 "unknown session 42"),
                (json.dumps({"type": "feed", "token_ids": [1], "role": "robot"}), "'role'"),
            ]
            for frame, reason in bad_frames:
                await ws.send(frame)
                reply = json.loads(await asyncio.wait_for(ws.recv(), timeout=30))
                assert reply["type"] == "error" and reason in reply["error"], reply
            await ws.send(b"\x00\xff binary garbage")
            assert json.loads(await ws.recv())["type"] == "error"
            for client in (ws, other):
                reply = await ask(client, {"type": "feed", "token_ids": [8, 9]})
                assert_reply_matches(reply, expected[1])

    asyncio.run(main())
    wait_until_no_sessions(live)


def test_sessions_are_reachable_only_on_their_own_connection(live: LiveServer) -> None:
    async def main() -> None:
        async with websockets.connect(live.ws, additional_headers=AUTH, open_timeout=60) as ws, \
                websockets.connect(live.ws, additional_headers=AUTH, open_timeout=60) as other:
            opened = await ask(ws, {"type": "open", "token_ids": [1, 2]})
            reply = await ask(other, {"type": "feed", "session": opened["session"],
                                      "token_ids": [3]})
            assert reply["type"] == "error" and "unknown session" in reply["error"]
            assert live.engine.stats().active_sessions == 1

    asyncio.run(main())
    wait_until_no_sessions(live)


def test_abrupt_disconnect_frees_the_session(live: LiveServer) -> None:
    async def main() -> None:
        ws = await websockets.connect(live.ws, additional_headers=AUTH, open_timeout=60)
        await ask(ws, {"type": "open", "token_ids": list(range(1, 40))})
        await ws.send(json.dumps({"type": "feed", "token_ids": list(range(100, 130))}))
        assert live.engine.pool.used_blocks > 0
        ws.transport.abort()  # no close handshake, reply never read

    asyncio.run(main())
    wait_until_no_sessions(live)


# ---- auth, HTTP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": API_KEY}])
def test_auth_rejected_without_the_key(live: LiveServer, headers: dict) -> None:
    async def connect() -> None:
        async with websockets.connect(live.ws, additional_headers=headers):
            pass

    with pytest.raises(websockets.exceptions.InvalidStatus) as rejected:
        asyncio.run(connect())
    assert rejected.value.response.status_code == 403
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{live.http}/v1/moderate", json=body, headers=headers).status_code == 401
    assert httpx.get(f"{live.http}/metrics", headers=headers).status_code == 401
    assert httpx.get(f"{live.http}/health").json() == {"status": "ok"}


def test_metrics_parse_as_prometheus(live: LiveServer) -> None:
    values = metrics(live)
    for name in ("qguard_active_sessions", "qguard_tokens_scored_total",
                 "qguard_step_latency_seconds_count", "qguard_batch_sessions_count",
                 "qguard_kv_blocks_used", "qguard_kv_blocks_total", "qguard_kv_pool_usage_ratio"):
        assert name in values, name
    assert values["qguard_kv_blocks_total"] == live.engine.pool.num_blocks


def test_moderate_matches_moderate_conversation(live: LiveServer,
                                                tiny_guard: StreamGuard) -> None:
    messages = [{"role": "user", "content": "Tell me a story"},
                {"role": "assistant", "content": "Once upon a time there was a fox."}]
    reply = httpx.post(f"{live.http}/v1/moderate", json={"messages": messages}, headers=AUTH,
                       timeout=30)
    assert reply.status_code == 200
    body = reply.json()
    expected = tiny_guard.moderate_conversation(messages)
    assert body["prompt"]["risk_level"] == expected.prompt_risk_level
    assert body["prompt"]["position"] == expected.user_end
    response = expected.response_verdicts
    assert body["response"]["start"] == expected.response_start
    assert body["response"]["risk_level"] == response.risk_level
    assert body["response"]["risk_prob"] == pytest.approx(response.risk_prob, abs=1e-4)
    seen = list(zip(response.positions, response.risk_level, response.category))
    assert body["decision"]["response"] == official_decision(seen)
    wait_until_no_sessions(live)


@pytest.mark.parametrize(("content", "reason"), [
    (b"{not json", "not valid JSON"),
    (json.dumps({"msgs": []}).encode(), '"messages"'),
    (json.dumps({"messages": []}).encode(), "non-empty list"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "unknown role"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode(), "no user turn"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(), "string 'content'"),
])
def test_moderate_rejects_bad_bodies_with_400(live: LiveServer, content: bytes,
                                              reason: str) -> None:
    reply = httpx.post(f"{live.http}/v1/moderate", content=content, timeout=30,
                       headers={**AUTH, "Content-Type": "application/json"})
    assert reply.status_code == 400
    assert reason in reply.json()["error"]


def official_decision(seen: list[tuple[int, str, str]]) -> dict:
    """The decision JSON the official rule gives over the response tokens seen so far."""
    label, index = consecutive_unsafe([level for _, level, _ in seen])
    if index < 0:
        return {"risk_level": "Safe", "category": None, "flag_position": None}
    position, _, category = seen[index]
    return {"risk_level": label, "category": category, "flag_position": position}


def test_decision_tracker_follows_the_official_rule_and_rollback(tiny_guard: StreamGuard) -> None:
    state = tiny_guard.open_stream()
    verdicts = tiny_guard.moderate(state, list(range(100, 160)), "assistant")
    tiny_guard.close_stream(state)
    monitor = Monitor(policy=ConsecutiveUnsafe())  # what the server keeps per session
    monitor.record(0, token_verdicts(verdicts))
    seen = list(zip(verdicts.positions, verdicts.risk_level, verdicts.category))
    assert decision_json(monitor.policy.verdict()) == official_decision(seen)
    for length in (45, 20, 3):
        monitor.truncate(length)
        assert decision_json(monitor.policy.verdict()) == official_decision(seen[:length])


def test_pool_exhaustion_gives_an_error_frame_and_the_server_keeps_serving(
        tiny_guard: StreamGuard) -> None:
    server = LiveServer(Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=32)))
    server.start()
    try:
        async def main() -> None:
            async with websockets.connect(server.ws, additional_headers=AUTH) as ws:
                first = await ask(ws, {"type": "open", "token_ids": list(range(1, 25))})
                refused = await ask(ws, {"type": "open", "token_ids": list(range(1, 17))})
                assert refused["type"] == "error" and refused["code"] == "pool_exhausted"
                assert "KV pool exhausted" in refused["error"]
                assert server.engine.stats().active_sessions == 1
                await ask(ws, {"type": "close", "session": first["session"]})
                reopened = await ask(ws, {"type": "open", "token_ids": list(range(1, 17))})
                assert reopened["type"] == "opened" and reopened["length"] == 16

        asyncio.run(main())
        wait_until_no_sessions(server)
    finally:
        server.stop()


# ---- one tracker: the server's frames report what the library's callbacks report ---------------
TRIGGER_UNSAFE, TRIGGER_CONTROVERSIAL = (500, 501), (600,)


def test_server_frames_report_the_transitions_and_flags_of_the_library_callbacks(
        tmp_path) -> None:
    """One stream fed both ways: StreamGuard with callbacks, and the server's WebSocket. The first
    assistant token is Unsafe (a Safe -> Unsafe transition on the role's first token), a user
    turn sits between assistant tokens, and a rollback drops a flag."""
    path = make_trigger_checkpoint(tmp_path, TRIGGER_UNSAFE, TRIGGER_CONTROVERSIAL, category=3)
    guard = StreamGuard.from_pretrained(path, device="cpu")
    prompt = [10, 11, 12]
    chunks = [([500], "assistant"), ([501, 13], "assistant"), ([600], "user"),
              ([600, 600, 14], "assistant"), ([501, 500], "assistant")]
    rollback_to, after_rollback = 7, [([600, 600], "assistant")]

    transitions, flags = [], []
    hooks = Hooks()
    hooks.on_transition(lambda e: transitions.append(
        {"position": e.position, "role": e.role, "from": e.previous_level, "to": e.level}))
    hooks.on_flag(lambda e: flags.append((e.decision.position, e.decision.label)))
    state = guard.open_stream()
    monitor = attach(state, ConsecutiveUnsafe(), hooks, policy_start=len(prompt))
    guard.moderate(state, prompt, "user")
    library = []
    for ids, role in chunks:
        guard.moderate(state, ids, role)
        library.append((list(transitions), list(flags), decision_json(monitor.policy.verdict())))
        transitions.clear(), flags.clear()
    guard.rollback(state, rollback_to)
    rolled_decision = decision_json(monitor.policy.verdict())
    for ids, role in after_rollback:
        guard.moderate(state, ids, role)
        library.append((list(transitions), list(flags), decision_json(monitor.policy.verdict())))
        transitions.clear(), flags.clear()
    guard.close_stream(state)
    assert library[0][0] == [{"position": 3, "role": "assistant", "from": "Safe", "to": "Unsafe"}]
    assert any(frame_flags for _, frame_flags, _ in library)

    server = LiveServer(Engine(guard, EngineSettings(block_size=4, max_tokens=256)))
    server.start()
    try:
        async def main() -> list:
            frames = []
            async with websockets.connect(server.ws, additional_headers=AUTH) as ws:
                opened = await ask(ws, {"type": "open", "token_ids": prompt, "role": "user"})
                assert opened["verdict"]["risk_level"] == "Safe"
                for ids, role in chunks:
                    frames.append(await ask(ws, {"type": "feed", "token_ids": ids, "role": role}))
                rolled = await ask(ws, {"type": "rollback", "length": rollback_to})
                assert rolled["decision"] == rolled_decision
                for ids, role in after_rollback:
                    frames.append(await ask(ws, {"type": "feed", "token_ids": ids, "role": role}))
            return frames

        frames = asyncio.run(main())
    finally:
        server.stop()
    served = [(f["transitions"], [(flag["position"], flag["risk_level"]) for flag in f["flags"]],
               f["decision"]) for f in frames]
    assert served == library
