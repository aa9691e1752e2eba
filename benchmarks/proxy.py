"""The guard proxy's added latency: the same streamed completions read directly from a paced fake
upstream and through `qguard-stream proxy` (in this process, loopback), interleaved.

    python -m benchmarks.proxy --shape small --requests 20 --out benchmarks/results

The upstream (benchmarks/fake_upstream.py) streams a fixed text in deltas of `--delta-chars`
characters every `--interval-ms`, like an LLM decoding, and notes when it sent each delta. Per
request: time to the first content byte, and the arrival time of each content chunk. Reported,
p50/p99:
- `ttft_ms`: time-to-first-token, direct, through the proxy, and added (proxy - direct);
- `chunk_delay_ms`: per chunk the client receives, its arrival minus the time the upstream sent
  the last character it carries (direct: the loopback's own cost; proxy: that plus the guard);
- `added_per_char_ms`: per character, its proxy arrival minus its direct arrival.
The proxy's figures include the holdback: with holdback h a token's text leaves only after h
more tokens arrived. The guard has random `--shape` weights with heads that never flag (so every
stream runs to its end); CPU by default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.fake_upstream import FakeUpstream, Loopback

TEXT = ("To make bread, mix flour, water, salt and yeast; knead the dough for ten minutes, let it "
        "rise for an hour, shape it, let it rise again, and bake it at 220 degrees for thirty "
        "minutes until the crust is brown and it sounds hollow when tapped.")


def read(url: str, body: dict) -> tuple[float, list[float], list[str], float]:
    """(seconds to the first content, arrival of each content chunk, each chunk's text, the
    perf_counter() it began at) of one stream."""
    began = time.perf_counter()
    first, arrivals, text = None, [], []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    now = time.perf_counter() - began
                    first = now if first is None else first
                    arrivals.append(now)
                    text.append(content)
    return first if first is not None else float("nan"), arrivals, text, began


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--delta-chars", type=int, default=4)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--holdback", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 1000 or args.interval_ms < 0:
        parser.error("--requests must be in [1, 1000] and --interval-ms >= 0")
    import torch

    from qguard_stream import StreamGuard
    from qguard_stream.checkpoints import make_trigger_checkpoint
    from qguard_stream.engine import Engine
    from qguard_stream.proxy.app import create_proxy_app

    torch.set_num_threads(2)
    upstream = FakeUpstream()
    upstream.text, upstream.sizes = TEXT, [args.delta_chars]
    upstream.pause = args.interval_ms / 1000
    # Random backbone, heads that say Safe everywhere (no triggers): the full cost of guarding,
    # and no flag cuts a stream short.
    directory = make_trigger_checkpoint(tempfile.mkdtemp(prefix="qguard-proxy-"), [],
                                        shape=args.shape)
    guard = StreamGuard.from_pretrained(directory, device=args.device)
    proxy = Loopback(create_proxy_app(Engine(guard), f"{upstream.loop.url}/v1",
                                      holdback=args.holdback))
    body = {"model": "fake", "stream": True,
            "messages": [{"role": "user", "content": "How do I bake bread?"}]}
    try:
        read(proxy.url, body)  # warm-up (the guard's first steps, the tokenizer)
        direct_ttft, proxy_ttft, added = [], [], []
        delays: dict[str, list[float]] = {"direct": [], "proxy": []}
        for _ in range(args.requests):  # interleaved: load on the box falls on both alike
            d_first, d_arrivals, d_pieces, d_began = read(upstream.loop.url, body)
            delays["direct"] += _chunk_delays(d_began, d_arrivals, d_pieces, upstream)
            p_first, p_arrivals, p_pieces, p_began = read(proxy.url, body)
            delays["proxy"] += _chunk_delays(p_began, p_arrivals, p_pieces, upstream)
            if "".join(p_pieces) != "".join(d_pieces):
                raise SystemExit(f"the proxy changed the text: {''.join(p_pieces)!r}")
            direct_ttft.append(d_first)
            proxy_ttft.append(p_first)
            # the proxy regroups the text into its own chunks: compare character by character
            added += [p - d for p, d in zip(_char_times(p_arrivals, p_pieces),
                                             _char_times(d_arrivals, d_pieces))]
    finally:
        proxy.stop()
        upstream.loop.stop()
    report = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shape": args.shape,
        "device": args.device, "requests": args.requests, "delta_chars": args.delta_chars,
        "interval_ms": args.interval_ms, "holdback": args.holdback,
        "ttft_ms": {name: {"p50": round(1000 * percentile(v, 0.5), 2),
                           "p99": round(1000 * percentile(v, 0.99), 2)}
                    for name, v in (("direct", direct_ttft), ("proxy", proxy_ttft),
                                    ("added", [p - d for p, d in zip(proxy_ttft, direct_ttft)]))},
        "chunk_delay_ms": {name: {"p50": round(1000 * percentile(v, 0.5), 2),
                                  "p99": round(1000 * percentile(v, 0.99), 2)}
                           for name, v in delays.items()},
        "added_per_char_ms": {"p50": round(1000 * percentile(added, 0.5), 2),
                              "p99": round(1000 * percentile(added, 0.99), 2),
                              "mean": round(1000 * statistics.fmean(added), 2)},
    }
    print(json.dumps(report, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"proxy_{args.shape}_{args.device}.json").write_text(json.dumps(report, indent=2))
    return 0


def _chunk_delays(began: float, arrivals: list[float], pieces: list[str],
                  upstream: FakeUpstream) -> list[float]:
    """Per chunk of the stream just read: its arrival minus when the upstream sent the last
    character it carries."""
    sent = _char_times([at - began for at in upstream.sent_at], upstream.deltas())
    delays, end = [], 0
    for arrival, piece in zip(arrivals, pieces):
        end += len(piece)
        delays.append(arrival - sent[end - 1])
    return delays


def _char_times(arrivals: list[float], pieces: list[str]) -> list[float]:
    """The arrival time of every character, from the chunks' arrival times and texts."""
    return [at for at, piece in zip(arrivals, pieces) for _ in piece]


if __name__ == "__main__":
    raise SystemExit(main())
