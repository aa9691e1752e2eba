"""Soak test: N WebSocket clients for M minutes against one server, with abuse mixed in.

    python -m benchmarks.soak --clients 16 --minutes 10 --out benchmarks/results

Starts its own server (a subprocess on 127.0.0.1, as benchmarks/load.py does) over a random
checkpoint of `--shape`. Each client, until the deadline, holds one session and per step picks:
feed a chunk of 1-8 ids (most steps), roll back, send an oversized frame (must be answered
`too_large`), send a malformed frame (`bad_request`), close the session and open another, or drop
the connection without a close frame and reconnect. Reports the errors by code (and any reply that
was not the one expected), the server's RSS and KV blocks in use over time, and whether the
verdicts of every session closed normally equal the same history scored in one StreamGuard
session in this process (the reference). Bounded in clients and time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import websockets

from benchmarks.load import free_port, kv_use, start_server, wait_healthy

VOCAB = 151936
MAX_CLIENTS, MAX_MINUTES = 256, 60.0
FRAME_LIMIT = 1 << 20  # the server's default --max-frame-bytes
SESSION_CAP = 400  # tokens; a session past it rolls back to its prompt


@dataclass
class Session:
    history: list[tuple[list[int], str]]  # what was scored, in order
    last_reply: dict | None = None

    @property
    def length(self) -> int:
        return sum(len(ids) for ids, _ in self.history)

    def truncate(self, length: int) -> None:
        kept, total = [], 0
        for ids, role in self.history:
            take = ids[:max(0, length - total)]
            if take:
                kept.append((take, role))
            total += len(ids)
        self.history = kept


@dataclass
class ClientLog:
    codes: Counter = field(default_factory=Counter)  # error codes received (expected ones too)
    unexpected: list[str] = field(default_factory=list)
    finished: list[Session] = field(default_factory=list)  # closed normally: checked later
    steps: int = 0
    tokens: int = 0
    drops: int = 0


async def client(url: str, seed: int, stop_at: float) -> ClientLog:
    rng, log = random.Random(seed), ClientLog()

    def ids(count: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(count)]

    while time.monotonic() < stop_at:
        async with websockets.connect(url, max_size=None) as ws:
            async def ask(frame: dict | str) -> dict:
                await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
                return json.loads(await asyncio.wait_for(ws.recv(), timeout=120))

            async def open_session() -> Session:
                prompt = ids(rng.randint(4, 24))
                reply = await ask({"type": "open", "token_ids": prompt})
                if reply.get("type") != "opened":
                    log.unexpected.append(f"open: {reply}")
                return Session([(prompt, "user")])

            session = await open_session()
            dropped = False
            while time.monotonic() < stop_at and not dropped:
                log.steps += 1
                roll = rng.random()
                if roll < 0.75:
                    chunk = ids(rng.randint(1, 8))
                    reply = await ask({"type": "feed", "token_ids": chunk})
                    if reply.get("type") == "verdicts":
                        session.history.append((chunk, "assistant"))
                        session.last_reply = reply
                        log.tokens += len(chunk)
                    else:
                        log.codes[reply.get("code", "?")] += 1
                        if reply.get("code") != "pool_exhausted":
                            log.unexpected.append(f"feed: {reply}")
                    if session.length > SESSION_CAP:
                        prompt = len(session.history[0][0])
                        reply = await ask({"type": "rollback", "length": prompt})
                        if reply.get("type") != "rolled_back":
                            log.unexpected.append(f"rollback to the prompt: {reply}")
                        session.truncate(prompt)
                        session.last_reply = None
                elif roll < 0.82:
                    length = rng.randint(1, session.length)
                    reply = await ask({"type": "rollback", "length": length})
                    if reply.get("type") == "rolled_back":
                        session.truncate(length)
                        session.last_reply = None
                    else:
                        log.unexpected.append(f"rollback: {reply}")
                elif roll < 0.85:
                    reply = await ask("x" * (FRAME_LIMIT + 1))
                    log.codes[reply.get("code", "?")] += 1
                    if reply.get("code") != "too_large":
                        log.unexpected.append(f"oversize: {reply}")
                elif roll < 0.88:
                    reply = await ask(rng.choice(['{"type": "feed", "token_ids": [-3]}',
                                                  "[" * 500 + "]" * 500, "{nope"]))
                    log.codes[reply.get("code", "?")] += 1
                    if reply.get("code") != "bad_request":
                        log.unexpected.append(f"malformed: {reply}")
                elif roll < 0.95:
                    reply = await ask({"type": "close"})
                    if reply.get("type") != "closed":
                        log.unexpected.append(f"close: {reply}")
                    if session.last_reply is not None:
                        log.finished.append(session)
                    session = await open_session()
                else:  # vanish without a close frame; the server must free the session
                    ws.transport.abort()
                    log.drops += 1
                    dropped = True
    return log


async def sample(base: str, pid: int, stop: asyncio.Event, samples: list[dict],
                 every_s: float) -> None:
    began = time.monotonic()
    async with httpx.AsyncClient() as http:
        while not stop.is_set():
            text = (await http.get(f"{base}/metrics", timeout=30)).text
            used = next((line.split()[-1] for line in text.splitlines()
                         if line.startswith("qguard_kv_blocks_used ")), "nan")
            samples.append({"t_s": round(time.monotonic() - began, 1), "rss_mb": rss_mb(pid),
                            "kv_blocks_used": float(used)})
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


async def drive(base: str, url: str, pid: int, args: argparse.Namespace
                ) -> tuple[list[ClientLog], list[dict]]:
    stop_at = time.monotonic() + args.minutes * 60
    stop, samples = asyncio.Event(), []
    sampler = asyncio.create_task(sample(base, pid, stop, samples, args.sample_every))
    logs = await asyncio.gather(*(client(url, seed, stop_at) for seed in range(args.clients)))
    await asyncio.sleep(1.0)  # the server frees dropped connections' sessions
    stop.set()
    await sampler
    return list(logs), samples


def check_reference(model: str, logs: list[ClientLog], limit: int) -> dict:
    """Re-score up to `limit` normally closed sessions in one StreamGuard session each."""
    from qguard_stream import StreamGuard

    guard = StreamGuard.from_pretrained(model, device="cpu")
    sessions = [s for log in logs for s in log.finished][:limit]
    mismatched = 0
    worst = 0.0
    for session in sessions:
        state = guard.open_stream()
        for ids, role in session.history:
            verdicts = guard.moderate(state, ids, role)
        guard.close_stream(state)
        reply = session.last_reply
        error = max(abs(a - b) for a, b in zip(reply["risk_prob"], verdicts.risk_prob))
        worst = max(worst, error)
        if reply["risk_level"] != verdicts.risk_level or error > 1e-4:
            mismatched += 1
    return {"checked": len(sessions), "mismatched": mismatched, "max_risk_prob_error": worst}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds")
    parser.add_argument("--kv-tokens", type=int, default=65536)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--check", type=int, default=500, help="closed sessions re-scored")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.minutes <= MAX_MINUTES:
        parser.error(f"--clients must be in [1, {MAX_CLIENTS}] and --minutes in (0, "
                     f"{MAX_MINUTES}], got {args.clients}, {args.minutes}")
    args.device, args.torch_threads = "cpu", None
    from qguard_stream.checkpoints import make_random_checkpoint

    model = str(make_random_checkpoint(tempfile.mkdtemp(prefix="qguard-soak-"), args.shape, 3))
    port = free_port()
    base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/stream"
    server = start_server(model, port, args)
    try:
        wait_healthy(base, server)
        began = time.monotonic()
        logs, samples = asyncio.run(drive(base, url, server.pid, args))
        wall = time.monotonic() - began
        used_at_end = kv_use(base)[0]
    finally:
        server.terminate()
        server.wait(timeout=30)
    codes = sum((log.codes for log in logs), Counter())
    unexpected = [u for log in logs for u in log.unexpected]
    report = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shape": args.shape, "clients": args.clients, "minutes": args.minutes,
        "wall_s": round(wall, 1), "steps": sum(log.steps for log in logs),
        "tokens_scored": sum(log.tokens for log in logs),
        "dropped_connections": sum(log.drops for log in logs),
        "sessions_closed": sum(len(log.finished) for log in logs),
        "error_codes": dict(codes), "unexpected": len(unexpected),
        "unexpected_examples": [u[:300] for u in unexpected[:5]],
        "kv_blocks_used_at_end": used_at_end,
        "rss_mb": {"first": samples[0]["rss_mb"] if samples else None,
                   "max": max((s["rss_mb"] for s in samples), default=None),
                   "last": samples[-1]["rss_mb"] if samples else None},
        "reference": check_reference(model, logs, args.check),
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"soak_{args.shape}.json").write_text(json.dumps(report, indent=2))
    ok = not unexpected and used_at_end == 0 and report["reference"]["mismatched"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
