"""The guard on Ray Serve (`qguard-stream serve --ray`): two replicas of a tiny checkpoint on a
local Ray cluster (2 CPUs, half a CPU per replica), reached over loopback through Serve's HTTP
proxy. Sessions stick to one replica for all their calls (x-session-id, consistent hashing, no
fallback); when a replica is killed mid-stream, or stopped by a scale-down, its sessions (HTTP and
WebSocket) resume through qguard_stream.client on a live one, and every reply equals that of a
single-process server that never lost them. /v1/moderate, /metrics and the KV-pool autoscaling
metric answer through the deployment as on one server."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

if importlib.util.find_spec("ray") is None:
    pytest.skip("the ray extra is not installed", allow_module_level=True)

import ray
import websockets.sync.client

from benchmarks.fake_upstream import Loopback
from benchmarks.load import free_port, stop, wait_healthy
from qguard_stream import StreamGuard
from qguard_stream.client import SessionClient
from qguard_stream.engine import Engine, EngineSettings
from qguard_stream.server import create_app
from qguard_stream.server.protocol import ServerLimits

from oracles import PROMPT, expected_replies, run, same, script

STARTUP_S = 150
DRAIN_S = 2.0  # seconds a stopping replica serves its open WebSockets before it is killed


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Iterator[Loopback]:
    engine = Engine(StreamGuard.from_pretrained(tiny_checkpoint, device="cpu"),
                    EngineSettings(max_tokens=8192))
    served = Loopback(create_app(engine))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def deployment(tiny_checkpoint: Path, tmp_path_factory) -> Iterator[str]:
    """`qguard-stream serve --ray --replicas 2`, which starts its own local Ray cluster (2 CPUs),
    as a user runs it; this process then joins that cluster as a driver (to kill a replica, to
    redeploy). The cluster is not started from this process: pytest's process holds many
    reserved-but-unused KV pools by now, and Ray forks its daemons, which the kernel may refuse
    for so large a process."""
    gc.collect()
    port = free_port()
    executable = shutil.which("qguard-stream", path=str(Path(sys.executable).parent))
    log_path = tmp_path_factory.mktemp("ray") / "serve.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [executable or "qguard-stream", "serve", "--ray", "--model", str(tiny_checkpoint),
         "--replicas", "2", "--num-cpus-per-replica", "0.5", "--torch-threads", "1",
         "--max-tokens", "8192", "--drain-timeout", str(DRAIN_S), "--host", "127.0.0.1",
         "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        wait_healthy(url, process, STARTUP_S, log=log_path)
        ray.init(address="auto", log_to_driver=False)
        wait_until_routed(url, deadline)  # both replicas in the ring: sessions stay put
        yield url
    finally:
        ray.shutdown()
        stop(process)
        log.close()


def wait_until_routed(url: str, deadline: float, replicas: int = 2) -> None:
    """Until the proxy routes to every replica (keys spread over the ring reach `replicas`
    distinct ones), so no session opened afterwards moves when a late replica joins."""
    seen: set[str] = set()
    while time.monotonic() < deadline:
        for number in range(16):
            reply = httpx.get(f"{url}/health", headers={"x-session-id": f"probe-{number}"},
                              timeout=10)
            seen.add(reply.headers.get("x-qguard-replica", ""))
        if len(seen - {""}) >= replicas:
            return
        time.sleep(0.25)
    raise AssertionError(f"the proxy routed to {sorted(seen)} only")


def replica_actor(replica: str):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(replica) and "SERVE_REPLICA" in actor["name"]:
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no replica actor named ...{replica}")


def test_sessions_stick_to_one_replica_and_both_replicas_serve(deployment) -> None:
    by_session: dict[str, set[str]] = {}
    for number in range(16):
        key = f"sticky-{number}"
        headers = {"x-session-id": key}
        replies = [httpx.post(f"{deployment}/v1/sessions", headers=headers, timeout=30,
                              json={"messages": PROMPT})]
        replies += [httpx.post(f"{deployment}/v1/sessions/{key}/feed", headers=headers,
                               timeout=30, json={"text": f" chunk {i}"}) for i in range(4)]
        assert all(reply.status_code == 200 for reply in replies), replies[-1].text
        by_session[key] = {reply.headers["x-qguard-replica"] for reply in replies}
        httpx.delete(f"{deployment}/v1/sessions/{key}", headers=headers, timeout=30)
    assert all(len(replicas) == 1 for replicas in by_session.values()), by_session
    assert len(set().union(*by_session.values())) == 2  # both replicas hold sessions
    # a WebSocket connection stays on the replica that accepted it
    with websockets.sync.client.connect(
            deployment.replace("http", "ws") + "/v1/stream",
            additional_headers={"x-session-id": "ws-1"}) as socket_:
        socket_.send(json.dumps({"type": "open", "token_ids": [1, 2, 3]}))
        assert json.loads(socket_.recv(timeout=30))["replica"] in set().union(
            *by_session.values())


def close_to(actual: object, expected: object) -> None:
    """JSON equal, floats within 1e-4 (the replicas run torch on one thread)."""
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-4)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys()
        for key in expected:
            close_to(actual[key], expected[key])
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected)
        for item, reference in zip(actual, expected):
            close_to(item, reference)
    else:
        assert actual == expected


def metric(text: str, name: str) -> float:
    """A sample's value in Prometheus text."""
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith(f"{name} "))


def test_moderate_metrics_and_the_kv_metric_answer_through_the_deployment(
        deployment, reference) -> None:
    from ray import serve

    from qguard_stream.deploy.ray import KV_METRIC

    body = {"messages": [*PROMPT, {"role": "assistant", "content": "Mix flour and water."}]}
    moderated = httpx.post(f"{deployment}/v1/moderate", json=body, timeout=30)
    assert moderated.status_code == 200 and moderated.headers["x-qguard-replica"]
    close_to(moderated.json(),
             httpx.post(f"{reference.url}/v1/moderate", json=body, timeout=30).json())
    headers = {"x-session-id": "kv-metric"}  # a session holds blocks on its replica
    opened = httpx.post(f"{deployment}/v1/sessions", headers=headers, timeout=30,
                        json={"messages": PROMPT})
    assert opened.status_code == 200, opened.text
    scraped = httpx.get(f"{deployment}/metrics", headers=headers, timeout=30)
    assert scraped.status_code == 200
    assert scraped.headers["x-qguard-replica"] == opened.headers["x-qguard-replica"]
    assert metric(scraped.text, "qguard_active_sessions") >= 1
    # what Serve's autoscaler reads, asked of the same replica (same key, same ring)
    handle = serve.get_deployment_handle("qguard-stream", app_name="qguard-stream")
    stats = handle.options(session_id="kv-metric").record_autoscaling_stats.remote().result(
        timeout_s=30)
    usage = metric(scraped.text, "qguard_kv_pool_usage_ratio")
    assert usage > 0 and stats == {KV_METRIC: pytest.approx(usage)}
    httpx.delete(f"{deployment}/v1/sessions/kv-metric", headers=headers, timeout=30)


def test_sessions_of_a_killed_replica_resume_elsewhere(deployment, reference) -> None:
    expected = {transport: expected_replies(reference, transport)
                for transport in ("http", "websocket")}
    steps = script()
    clients = {transport: SessionClient(deployment, transport=transport)
               for transport in ("http", "websocket")}
    try:
        sessions = [(transport, clients[transport].open(messages=PROMPT, holdback=2))
                    for transport in ["http"] * 6 + ["websocket"] * 2]
        for index, step in enumerate(steps[:5]):
            for transport, session in sessions:
                same(run(session, step), expected[transport][index])
        victim = sessions[0][1].opened["replica"]
        ray.kill(replica_actor(victim), no_restart=True)
        for index, step in enumerate(steps[5:], 5):
            for transport, session in sessions:
                same(run(session, step), expected[transport][index])
        moved = [session for _, session in sessions if session.opened["replica"] == victim]
        assert moved and all(session.resumes >= 1 for session in moved)
        for _, session in sessions:
            session.close()
    finally:
        for client in clients.values():
            client.close()


def test_scaling_down_moves_sessions_to_the_remaining_replica(deployment, reference,
                                                              tiny_checkpoint) -> None:
    """Redeploying with one replica: Serve removes one replica (the scale-down) and, the code
    version being new, replaces the other, so every session moves. Serve runs no user code on a
    stopping replica until it has no ongoing request, and an open WebSocket is one, so a replica
    holding WebSockets is killed when the drain timeout (`--drain-timeout`, DRAIN_S here) is up,
    not at Serve's 20 s default. Every session resumes on the replica left (WebSocket clients on
    the broken connection, HTTP ones on "session_unknown"), replies unchanged."""
    from ray import serve

    from qguard_stream.deploy.ray import build_app

    expected = {transport: expected_replies(reference, transport)
                for transport in ("http", "websocket")}
    steps = script()
    # one client's HTTP sessions, and WebSocket clients (a connection is routed on its own key)
    clients = [SessionClient(deployment, transport=transport)
               for transport in ("http", "websocket", "websocket")]
    try:
        sessions = [("http", clients[0].open(messages=PROMPT, holdback=2)) for _ in range(3)]
        sessions += [("websocket", client.open(messages=PROMPT, holdback=2))
                     for client in clients[1:]]
        old_replicas = set(ray_replicas())  # the killed one's successor too, started or not
        for index, step in enumerate(steps[:5]):
            for transport, session in sessions:
                same(run(session, step), expected[transport][index])
        app = build_app(str(tiny_checkpoint), replicas=1, num_cpus_per_replica=0.5,
                        torch_threads=1, settings=EngineSettings(max_tokens=8192),
                        limits=ServerLimits(), drain_timeout_s=DRAIN_S)
        with ThreadPoolExecutor(1) as pool:
            stopped = time.monotonic()
            redeployed = pool.submit(serve.run, app, name="qguard-stream", route_prefix="/")
            while old_replicas & set(ray_replicas()) and time.monotonic() - stopped < 60:
                time.sleep(0.1)
            drained_s = time.monotonic() - stopped  # Serve stops the old replicas in turn
            redeployed.result(timeout=STARTUP_S)
        assert drained_s < 2 * DRAIN_S + 8, drained_s
        assert len(ray_replicas()) == 1
        for index, step in enumerate(steps[5:], 5):
            for transport, session in sessions:
                same(run(session, step), expected[transport][index])
        assert all(session.resumes >= 1 for _, session in sessions)
        for _, session in sessions:
            session.close()
    finally:
        for client in clients:
            client.close()


def ray_replicas() -> list[str]:
    return [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if "SERVE_REPLICA" in actor["name"]]


def test_build_app_and_autoscale_options_are_checked(tiny_checkpoint) -> None:
    from qguard_stream.cli.serve import autoscale_range
    from qguard_stream.deploy.ray import build_app

    assert autoscale_range("1:4") == (1, 4)
    for bad in ("4:1", "x", "0:0"):
        with pytest.raises(Exception, match="MIN"):
            autoscale_range(bad)
    with pytest.raises(ValueError, match="replicas must be an int"):
        build_app(str(tiny_checkpoint), replicas=0)
    with pytest.raises(ValueError, match="autoscale"):
        build_app(str(tiny_checkpoint), autoscale=(3, 2))
    with pytest.raises(ValueError, match="drain_timeout_s"):
        build_app(str(tiny_checkpoint), drain_timeout_s=-1.0)
    app = build_app(str(tiny_checkpoint), autoscale=(1, 3))  # binds without a cluster
    assert app is not None


def test_the_autoscaler_adds_replicas_when_the_kv_pools_fill() -> None:
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from qguard_stream.deploy.ray import KV_METRIC, kv_aware_policy

    def context(usage: dict[str, float]) -> AutoscalingContext:
        return AutoscalingContext(
            deployment_id=None, deployment_name="g", app_name="a", current_num_replicas=2,
            target_num_replicas=2, running_replicas=list(usage), total_num_requests=2.0,
            total_queued_requests=0.0, aggregated_metrics={KV_METRIC: usage}, raw_metrics={},
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8,
            policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
            current_time=time.time(),
            config=AutoscalingConfig(min_replicas=1, max_replicas=8,
                                     target_ongoing_requests=64))

    full, _ = kv_aware_policy(context({"r1": 0.9, "r2": 0.9}))
    assert full == 3  # ceil(2 replicas x 0.9 / 0.75)
    light, _ = kv_aware_policy(context({"r1": 0.1, "r2": 0.2}))
    assert light <= 2  # requests alone decide: few ongoing, no scale-up
