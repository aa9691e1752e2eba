"""Qwen3Guard-Gen served over the OpenAI API: requests/s and latency with 1, 8 and 32 concurrent
clients, continuously batched vs one sequence at a time, in one process on loopback.

    python -m benchmarks.gen_serve --shape small --requests 32 --out benchmarks/results

A random Gen checkpoint of `--shape` (its greedy output rarely stops early, so every request
decodes exactly `--max-tokens` tokens: equal work per request) served by `create_gen_app`; C
`openai.AsyncOpenAI` clients send `--requests` chat completions in all, back to back. "batched"
is the server as shipped; "one at a time" caps the decoder's running batch at one sequence.
Reported per (mode, C): requests/s, generated tokens/s, p50/p99 request latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import openai
import torch

from benchmarks.fake_upstream import Loopback
from qguard_stream.checkpoints import make_random_gen_checkpoint
from qguard_stream.gen.guard import GenGuard
from qguard_stream.server.chat import create_gen_app


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in range(requests):
        queue.put_nowait(number)
    latencies: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while not queue.empty():
            number = queue.get_nowait()
            began = time.perf_counter()
            reply = await api.chat.completions.create(
                model="gen", max_tokens=max_tokens,
                messages=[{"role": "user", "content": f"Request {number}: is this safe?"}])
            latencies.append(time.perf_counter() - began)
            tokens += reply.usage.completion_tokens

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - began
    await api.close()
    return {"clients": clients, "requests": requests, "seconds": round(elapsed, 2),
            "requests_per_s": round(requests / elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1),
            "p50_ms": round(1000 * percentile(latencies, 0.5), 1),
            "p99_ms": round(1000 * percentile(latencies, 0.99), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="per cell")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 1024 or not 1 <= args.max_tokens <= 1024:
        parser.error("--requests and --max-tokens must be in 1..1024")
    concurrency = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        path = make_random_gen_checkpoint(Path(scratch) / "gen", args.shape, seed=0)
        gen = GenGuard.from_pretrained(path, device=args.device)
        served = Loopback(create_gen_app(gen, "gen"))
        rows = []
        try:
            asyncio.run(drive(served.url, 1, 2, args.max_tokens))  # warm-up
            for clients in concurrency:
                for mode, cap in (("batched", None), ("one at a time", 1)):
                    gen.decoder.max_sequences = cap
                    row = {"mode": mode, **asyncio.run(
                        drive(served.url, clients, args.requests, args.max_tokens))}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            served.stop()
    report = {"shape": args.shape, "device": args.device, "max_tokens": args.max_tokens,
              "torch_threads": torch.get_num_threads(), "rows": rows}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        target = args.out / f"gen_serve_{args.shape}_{args.device}.json"
        target.write_text(json.dumps(report, indent=2))
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
