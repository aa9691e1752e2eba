"""The guard server on Ray Serve: one engine per replica, sessions kept on their replica.

    from qguard_stream.deploy.ray import build_app
    serve.run(build_app("Qwen/Qwen3Guard-Stream-0.6B", replicas=4, num_gpus_per_replica=1))

Each replica serves the same FastAPI app as `qguard-stream serve` (WebSocket /v1/stream, the
HTTP session API, /v1/moderate, /metrics, /health) through `@serve.ingress`, over its own engine.
Routing is Ray Serve's consistent hash on the `x-session-id` header (`handle.options(
session_id=...)` for handles) with no fallback replicas, so a session's calls reach the replica
that holds its KV cache and never silently land on one without it; a WebSocket connection stays
on the replica that accepted it. When a replica goes away (it died, or autoscaling removed it),
its sessions' next calls get "session_unknown" (or a broken connection) and
`qguard_stream.client` re-opens them on the replica that now owns their key. Autoscaling follows
Ray Serve's `target_ongoing_requests` and, where Serve takes custom metrics, the replicas' KV pool
use (`kv_aware_policy`).

Scale-down: Serve calls the replica actor's `perform_graceful_shutdown`, which waits until the
replica has no ongoing requests (polled every `graceful_shutdown_wait_loop_s`) and only then runs
the user code's `__del__` (the app's shutdown); the controller kills the replica once
`graceful_shutdown_timeout_s` has passed. No user code runs before that wait, and an open
WebSocket is an ongoing request for its whole life, so a replica cannot close its WebSockets
early: it serves them (it holds their sessions) until the kill. `drain_timeout_s` (5 s, Serve's
default 20) bounds that; the client takes the broken connection as a lost session and resumes on
the replica that owns its key now. HTTP sessions are between requests, not ongoing: the router
sends their next call to another replica at once, which answers "session_unknown".
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

try:
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingContext, RequestRouterConfig
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("qguard_stream.deploy.ray needs Ray Serve: pip install "
                      "'qguard-stream[ray]'") from error

from qguard_stream.engine.settings import EngineSettings
from qguard_stream.server.protocol import ServerLimits

ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
KV_METRIC = "kv_pool_usage"
KV_TARGET = 0.75  # mean KV pool use above which the autoscaler adds replicas
MAX_ONGOING = 4096  # a WebSocket counts as one ongoing request for as long as it is open
DRAIN_TIMEOUT_S = 5.0  # a stopping replica is killed this long after, WebSockets open or not
DRAIN_POLL_S = 0.5  # how often a stopping replica looks for its last ongoing request


@serve.ingress()
class GuardReplica:
    """One replica: a guard loaded on the replica's device and its batched engine."""

    def __init__(self, model: str, load: dict[str, Any], settings: dict[str, Any],
                 server: dict[str, Any]) -> None:
        import torch

        from qguard_stream.engine import Engine, settle_heap
        from qguard_stream.stream import StreamGuard

        if load.get("torch_threads"):
            torch.set_num_threads(load["torch_threads"])
        dtype = getattr(torch, load["dtype"]) if load.get("dtype") else None
        guard = StreamGuard.from_pretrained(model, device=load.get("device"), dtype=dtype)
        self.engine = Engine(guard, EngineSettings(**settings))
        settle_heap()  # a replica process: its model is built, exempt it from full GC passes
        self.server = server
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> Any:
        from qguard_stream.server import create_app

        limits = self.server.get("limits")
        return create_app(self.engine, api_key=self.server.get("api_key"),
                          limits=ServerLimits(**limits) if limits else None,
                          session_ttl_s=self.server.get("session_ttl_s"),
                          replica_id=self.replica)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metric: the share of the KV pool in use."""
        stats = self.engine.stats()
        return {KV_METRIC: stats.used_blocks / max(1, stats.total_blocks)}


def kv_aware_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Ray Serve's default policy (ongoing requests per replica), raised when the replicas' mean
    KV pool use is above KV_TARGET: sessions need KV blocks more than they need requests."""
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    desired, state = replica_queue_length_autoscaling_policy(ctx)
    usage = (ctx.aggregated_metrics or {}).get(KV_METRIC) or {}
    if usage and ctx.current_num_replicas:
        mean = sum(usage.values()) / len(usage)
        if mean > KV_TARGET:
            desired = max(desired, math.ceil(ctx.current_num_replicas * mean / KV_TARGET))
    low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    return max(low, min(high, int(desired))), state


def build_app(model: str, *, replicas: int = 1, autoscale: tuple[int, int] | None = None,
              num_gpus_per_replica: float = 0.0, num_cpus_per_replica: float = 1.0,
              target_ongoing_requests: float = 64.0, api_key: str | None = None,
              device: str | None = None, dtype: str | None = None,
              torch_threads: int | None = None, settings: EngineSettings | None = None,
              limits: ServerLimits | None = None, session_ttl_s: float | None = 600.0,
              drain_timeout_s: float = DRAIN_TIMEOUT_S, name: str = "qguard-stream") -> Any:
    """A bound Ray Serve application of the guard server: `replicas` fixed replicas, or
    `autoscale=(min, max)`; each replica gets `num_gpus_per_replica` GPUs (0: CPU) and
    `num_cpus_per_replica` CPUs, and its own engine with `settings`. A replica being stopped is
    killed `drain_timeout_s` seconds later, its WebSocket clients resuming elsewhere."""
    if autoscale is not None:
        low, high = autoscale
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"autoscale must be (min, max) with 0 <= min <= max, max >= 1, "
                             f"got {autoscale!r}")
        scaling: dict[str, Any] = {"autoscaling_config": AutoscalingConfig(
            min_replicas=low, max_replicas=high, initial_replicas=max(low, 1),
            target_ongoing_requests=target_ongoing_requests,
            policy={"policy_function": f"{__name__}:kv_aware_policy"})}
    elif isinstance(replicas, int) and not isinstance(replicas, bool) and replicas >= 1:
        scaling = {"num_replicas": replicas}
    else:
        raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    if not drain_timeout_s >= 0:
        raise ValueError(f"drain_timeout_s must be >= 0 seconds, got {drain_timeout_s!r}")
    if num_gpus_per_replica < 0 or num_cpus_per_replica <= 0:
        raise ValueError(f"GPUs per replica must be >= 0 and CPUs > 0, got "
                         f"{num_gpus_per_replica} and {num_cpus_per_replica}")
    if device is None:
        device = "cuda" if num_gpus_per_replica > 0 else "cpu"
    deployment = serve.deployment(GuardReplica, name=name).options(
        ray_actor_options={"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica},
        max_ongoing_requests=MAX_ONGOING, graceful_shutdown_timeout_s=drain_timeout_s,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER, request_router_kwargs={"num_fallback_replicas": 0}),
        **scaling)
    server = {"api_key": api_key, "session_ttl_s": session_ttl_s,
              "limits": asdict(limits) if limits is not None else None}
    load = {"device": device, "dtype": dtype, "torch_threads": torch_threads}
    return deployment.bind(model, load, asdict(settings or EngineSettings()), server)
