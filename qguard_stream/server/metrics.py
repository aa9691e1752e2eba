"""Prometheus metrics of one server: sessions, tokens scored, step latency, batch size, KV pool use.

Each app gets its own registry (several apps, e.g. in tests, never collide). Step metrics are fed by
an engine step listener; gauges are refreshed from the engine's stats at scrape time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qguard_stream.engine import EngineStats, StepStats

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge("qguard_active_sessions", "Open sessions", registry=r)
        self.connections = Gauge("qguard_websocket_connections", "Open WebSocket connections",
                                 registry=r)
        self.tokens_scored = Counter("qguard_tokens_scored", "Tokens scored", registry=r)
        self.step_latency = Histogram("qguard_step_latency_seconds", "Engine step wall time",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.batch_sessions = Histogram("qguard_batch_sessions", "Sessions per engine step",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("qguard_batch_tokens", "Tokens per engine step",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.kv_blocks_used = Gauge("qguard_kv_blocks_used", "KV pool blocks in use", registry=r)
        self.kv_blocks_total = Gauge("qguard_kv_blocks_total", "KV pool blocks", registry=r)
        self.sessions_expired = Counter("qguard_sessions_expired", "Idle sessions closed by "
                                        "the TTL", registry=r)
        self.kv_pool_usage = Gauge("qguard_kv_pool_usage_ratio", "Used / total KV blocks",
                                   registry=r)

    def observe_step(self, step: StepStats) -> None:
        self.tokens_scored.inc(step.tokens)
        self.step_latency.observe(step.seconds)
        self.batch_sessions.observe(step.sessions)
        self.batch_tokens.observe(step.tokens)

    def render(self, stats: EngineStats) -> bytes:
        self.active_sessions.set(stats.active_sessions)
        self.kv_blocks_used.set(stats.used_blocks)
        self.kv_blocks_total.set(stats.total_blocks)
        self.kv_pool_usage.set(stats.used_blocks / stats.total_blocks)
        return generate_latest(self.registry)


def add_health_and_metrics(app: FastAPI, authorized: Callable[[Mapping[str, str]], bool],
                           unauthorized: Callable[[], Response],
                           render: Callable[[], Awaitable[bytes]]) -> None:
    """GET /health (open to all) and GET /metrics (Prometheus text; `authorized` headers only),
    the same on every app (server, Gen chat completions, proxy)."""

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not authorized(request.headers):
            return unauthorized()
        return Response(await render(), media_type=PROMETHEUS_TYPE)
