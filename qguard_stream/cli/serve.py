"""`qguard-stream serve` (and `python -m qguard_stream.server`): the WebSocket/HTTP server over the
batched engine. The options parse without the server extra; running without it says what to
install.
"""

from __future__ import annotations

import argparse
import os
import sys

from qguard_stream.engine.settings import EngineSettings

API_KEY_ENV = "QGUARD_STREAM_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `qguard-stream serve`."""
    parser.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--kv-memory-gb", type=float, default=None, help="KV pool size in GiB")
    budget.add_argument("--max-tokens", type=int, default=None, help="KV pool size in tokens")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--on-pool-exhausted", choices=("error", "wait"), default="error")
    parser.add_argument("--pool-wait-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--log-level", default="info")
    limits = parser.add_argument_group("limits per frame or request (errors: 'too_large', 413)")
    limits.add_argument("--max-frame-bytes", type=int, default=1 << 20,
                        help="WebSocket frame or HTTP body (default 1 MiB)")
    limits.add_argument("--max-json-depth", type=int, default=32)
    limits.add_argument("--max-feed-text", type=int, default=256 * 1024,
                        help="characters of text per feed, or of an open's messages")
    limits.add_argument("--max-feed-tokens", type=int, default=16384,
                        help="token ids scored by one frame or request")
    limits.add_argument("--max-pending-text", type=int, default=16384,
                        help="characters held back between text feeds (an unfinished word)")
    parser.add_argument("--open-docs", action="store_true",
                        help="with an API key, serve /docs, /redoc and /openapi.json anyway")


def settings_from_args(args: argparse.Namespace) -> EngineSettings:
    """The engine settings the options ask for (raises ValueError for inconsistent ones)."""
    return EngineSettings(block_size=args.block_size, kv_memory_gb=args.kv_memory_gb,
                          max_tokens=args.max_tokens, max_batch_tokens=args.max_batch_tokens,
                          on_pool_exhausted=args.on_pool_exhausted,
                          pool_wait_timeout_s=args.pool_wait_timeout)


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    try:
        import uvicorn

        from qguard_stream.server import create_app
    except ImportError as err:
        print(f"error: 'serve' needs the server extra: {err} (pip install 'qguard-stream[server]')",
              file=sys.stderr)
        return 2
    import torch

    from qguard_stream.engine import Engine
    from qguard_stream.stream import StreamGuard

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    guard = StreamGuard.from_pretrained(args.model, device=args.device, dtype=dtype)
    from qguard_stream.server.protocol import ServerLimits

    limits = ServerLimits(args.max_frame_bytes, args.max_json_depth, args.max_feed_text,
                          args.max_feed_tokens, args.max_pending_text)
    app = create_app(Engine(guard, settings_from_args(args)),
                     api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, limits=limits,
                     open_docs=args.open_docs)
    # Frames over --max-frame-bytes get a 'too_large' error frame; past uvicorn's own bound
    # (16 MiB, or the limit if larger) the WebSocket layer closes the connection (1009).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                ws_max_size=max(16 << 20, args.max_frame_bytes + 1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qguard-stream serve", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
