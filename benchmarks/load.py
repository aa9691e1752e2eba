"""Load test: N concurrent WebSocket clients streaming token chunks to a moderation server.

    python -m benchmarks.load --clients 32 --rate 10 --chunk 4 --duration 20

Starts its own server (a subprocess on 127.0.0.1, a free port) over `--model` or a random
checkpoint of `--shape`; each client opens a session with a prompt, then sends a chunk of `--chunk`
assistant tokens `--rate` times a second (one chunk in flight; a late reply delays the next send,
with no catch-up burst) for `--duration` seconds, rolling back to its prompt when the session
reaches `--max-session-tokens`. Reports throughput (tokens/s), p50/p99 verdict latency (send ->
reply) and peak KV pool use (from /metrics). Bounded in clients, rate and time; loopback only.

With `--ray-replicas N` the server is `qguard-stream serve --ray --replicas N` on a local Ray
cluster (the ray extra), each client's connection carrying its own x-session-id, so clients
spread over the replicas; /metrics then reports whichever replica answers it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import websockets
from prometheus_client.parser import text_string_to_metric_families

VOCAB = 151936
MAX_CLIENTS, MAX_RATE, MAX_DURATION_S = 1024, 1000.0, 600.0


@dataclass
class ClientResult:
    latencies_s: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Terminate a server process and reap it (killed if it does not exit in `timeout_s`)."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)


def start_server(model: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "qguard_stream.server", "--model", model, "--host",
               "127.0.0.1", "--port", str(port), "--max-tokens", str(args.kv_tokens),
               "--block-size", str(args.block_size), "--log-level", "warning"]
    if getattr(args, "ray_replicas", 0):  # soak.py shares this without the option
        cpus = max(0.1, round((os.cpu_count() or 2) / args.ray_replicas, 2))
        command += ["--ray", "--replicas", str(args.ray_replicas),
                    "--num-cpus-per-replica", str(cpus)]
    if args.device:
        command += ["--device", args.device]
    if args.torch_threads:
        command += ["--torch-threads", str(args.torch_threads)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen(command, env=env)


def wait_healthy(base: str, server: subprocess.Popen, timeout_s: float = 240.0,
                 path: str = "/health", log: Path | None = None) -> None:
    """Until `base + path` answers 200; RuntimeError (with the tail of `log`) if the server
    process exits first or the time runs out."""
    def failed(why: str) -> RuntimeError:
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        return RuntimeError(f"{why}{': ' + tail if tail else ''}")

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise failed(f"server exited with code {server.returncode}")
        try:
            if httpx.get(f"{base}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise failed(f"server not healthy after {timeout_s}s")


def kv_use(base: str) -> tuple[float, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values["qguard_kv_blocks_used"], values["qguard_kv_blocks_total"]


async def client(url: str, seed: int, args: argparse.Namespace, stop_at: float) -> ClientResult:
    rng = random.Random(seed)
    result = ClientResult()
    prompt = [rng.randrange(VOCAB) for _ in range(args.prompt_tokens)]
    async with websockets.connect(url, open_timeout=60, max_size=None,
                                  additional_headers={"x-session-id": f"load-{seed}"}) as ws:
        await ws.send(json.dumps({"type": "open", "token_ids": prompt}))
        length = json.loads(await ws.recv())["length"]
        next_send = time.monotonic() + rng.random() / args.rate  # spread the clients' phases
        while next_send < stop_at:
            await asyncio.sleep(max(0.0, next_send - time.monotonic()))
            if length + args.chunk > args.max_session_tokens:
                await ws.send(json.dumps({"type": "rollback", "length": len(prompt)}))
                await ws.recv()
                length = len(prompt)
            chunk = [rng.randrange(VOCAB) for _ in range(args.chunk)]
            sent = time.monotonic()
            await ws.send(json.dumps({"type": "feed", "token_ids": chunk}))
            reply = json.loads(await ws.recv())
            if reply["type"] != "verdicts":
                result.errors += 1
            else:
                result.latencies_s.append(time.monotonic() - sent)
                result.tokens += args.chunk
                length = reply["length"]
            # one chunk in flight per client; when replies lag, send on reply (no catch-up burst)
            next_send = max(next_send + 1.0 / args.rate, time.monotonic())
        await ws.send(json.dumps({"type": "close"}))
        await ws.recv()
    return result


async def sample_kv(base: str, stop: asyncio.Event, peak: list[float]) -> None:
    async with httpx.AsyncClient() as http:
        while not stop.is_set():
            try:
                text = (await http.get(f"{base}/metrics", timeout=30)).text
            except httpx.HTTPError:
                text = ""  # a saturated server answers late; skip this sample
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "qguard_kv_blocks_used":
                        peak[0] = max(peak[0], sample.value)
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass


async def drive(base: str, url: str, args: argparse.Namespace) -> tuple[list[ClientResult],
                                                                        float, float]:
    stop, peak = asyncio.Event(), [0.0]
    sampler = asyncio.create_task(sample_kv(base, stop, peak))
    began = time.monotonic()
    stop_at = began + args.duration
    results = await asyncio.wait_for(
        asyncio.gather(*(client(url, seed, args, stop_at) for seed in range(args.clients))),
        timeout=args.duration + 120)
    elapsed = time.monotonic() - began
    stop.set()
    await sampler
    return results, elapsed, peak[0]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(args: argparse.Namespace, results: list[ClientResult], elapsed: float,
           peak_blocks: float, total_blocks: float) -> dict:
    latencies = [x for r in results for x in r.latencies_s]
    tokens = sum(r.tokens for r in results)
    return {
        "clients": args.clients, "rate_per_client": args.rate, "chunk": args.chunk,
        "duration_s": round(elapsed, 1), "shape": args.shape if not args.model else args.model,
        "torch_threads": args.torch_threads, "ray_replicas": args.ray_replicas,
        "tokens": tokens, "throughput_tok_s": round(tokens / elapsed, 1),
        "p50_ms": round(1000 * percentile(latencies, 0.50), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "errors": sum(r.errors for r in results),
        "kv_peak_blocks": int(peak_blocks), "kv_total_blocks": int(total_blocks),
        "kv_peak_pct": round(100 * peak_blocks / total_blocks, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rate", type=float, default=10.0, help="chunks per second per client")
    parser.add_argument("--chunk", type=int, default=4, help="tokens per chunk")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of streaming")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-session-tokens", type=int, default=1024)
    parser.add_argument("--model", default=None, help="checkpoint dir or hub id")
    parser.add_argument("--shape", default="small", help="random checkpoint shape if no --model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--kv-tokens", type=int, default=65536, help="KV pool size in tokens")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=None, help="server's torch threads")
    parser.add_argument("--ray-replicas", type=int, default=0,
                        help="serve on Ray Serve with this many replicas (0: one process)")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be in 1..{MAX_CLIENTS}, got {args.clients}")
    if not 0 < args.rate <= MAX_RATE:
        parser.error(f"--rate must be in (0, {MAX_RATE}], got {args.rate}")
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S}], got {args.duration}")
    if args.max_session_tokens < args.prompt_tokens + args.chunk:
        parser.error("--max-session-tokens must exceed --prompt-tokens + --chunk")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/stream"
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from qguard_stream.checkpoints import make_random_checkpoint

            model = str(make_random_checkpoint(Path(scratch) / "ckpt", args.shape, seed=0))
        server = start_server(model, port, args)
        try:
            wait_healthy(base, server)
            results, elapsed, peak = asyncio.run(drive(base, url, args))
            _, total = kv_use(base)
        finally:
            stop(server)
    print(json.dumps(report(args, results, elapsed, peak, total)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
