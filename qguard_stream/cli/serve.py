"""`qguard-stream serve` (and `python -m qguard_stream.server`): the WebSocket/HTTP server over the
batched engine for a Stream checkpoint, or OpenAI-compatible chat completions for a Gen checkpoint
(detected from config.json). The options parse without the server extra; running without it
says what to install.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from qguard_stream.engine.settings import DEFAULT_MAX_TOKENS, EngineSettings

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
    budget.add_argument("--kv-memory-gb", type=float, default=None,
                        help="KV pool size in GiB, all sessions together (default: "
                             "--max-tokens's; for a Gen checkpoint 2 GiB on CUDA, 4 on the CPU)")
    budget.add_argument("--max-tokens", type=int, default=None,
                        help="KV pool size in tokens, Stream checkpoints (default: "
                             f"{DEFAULT_MAX_TOKENS} when neither this nor --kv-memory-gb is given)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per KV block (default: 16 on CUDA, 64 on the CPU)")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--on-pool-exhausted", choices=("error", "wait"), default="error")
    parser.add_argument("--pool-wait-timeout", type=float, default=10.0, help="seconds")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--log-level", default="info")
    limits = parser.add_argument_group("limits per frame or request (errors: 'too_large', 413; "
                                       "a 400 on a Gen checkpoint's chat completions)")
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
    parser.add_argument("--served-model-name", default=None,
                        help="the model name /v1/models and chat completions answer with "
                             "(default: --model)")
    parser.add_argument("--session-ttl", type=float, default=600.0,
                        help="seconds an idle session is kept (default 600)")
    ray = parser.add_argument_group("Ray Serve (the ray extra): replicas with sticky sessions")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve")
    ray.add_argument("--replicas", type=int, default=1, help="fixed number of replicas")
    ray.add_argument("--autoscale", type=autoscale_range, default=None, metavar="MIN:MAX",
                     help="autoscale between MIN and MAX replicas instead")
    ray.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    ray.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    ray.add_argument("--target-ongoing-requests", type=float, default=64.0,
                     help="autoscaling target per replica (a WebSocket counts as one)")
    ray.add_argument("--drain-timeout", type=float, default=5.0,
                     help="seconds a replica being stopped keeps serving its open WebSockets "
                          "before it is killed and their clients resume elsewhere (default 5)")
    ray.add_argument("--ray-address", default=None,
                     help="an existing Ray cluster (default: RAY_ADDRESS, else a local one)")


def autoscale_range(text: str) -> tuple[int, int]:
    """'MIN:MAX' replicas."""
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas, got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, MAX >= 1, got {text!r}")
    return low, high


def settings_from_args(args: argparse.Namespace) -> EngineSettings:
    """The engine settings the options ask for (raises ValueError for inconsistent ones)."""
    return EngineSettings(block_size=args.block_size, kv_memory_gb=args.kv_memory_gb,
                          max_tokens=args.max_tokens, max_batch_tokens=args.max_batch_tokens,
                          on_pool_exhausted=args.on_pool_exhausted,
                          pool_wait_timeout_s=args.pool_wait_timeout)


def limits_from_args(args: argparse.Namespace) -> Any:
    """The ServerLimits the options ask for (imported here: the options parse without the
    server extra, whose package this import loads)."""
    from qguard_stream.server.protocol import ServerLimits

    return ServerLimits(args.max_frame_bytes, args.max_json_depth, args.max_feed_text,
                        args.max_feed_tokens, args.max_pending_text)


def served_model_name(args: argparse.Namespace) -> str:
    """The model name /v1/models and chat completions answer with: --served-model-name, else
    --model as given (a path or a hub id, as `vllm serve` does)."""
    return args.served_model_name or str(args.model)


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted."""
    if args.ray:
        return run_ray(args)
    try:
        import uvicorn

        from qguard_stream.server import create_app
    except ImportError as err:
        print(f"error: 'serve' needs the server extra: {err} (pip install 'qguard-stream[server]')",
              file=sys.stderr)
        return 2
    import torch

    from qguard_stream.cli.models import detect_kind
    from qguard_stream.engine import Engine, settle_heap
    from qguard_stream.stream import StreamGuard

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if detect_kind(args.model) == "gen":  # Qwen3Guard-Gen: OpenAI chat completions
        from qguard_stream.gen.guard import GenGuard
        from qguard_stream.server.chat import create_gen_app

        gen = GenGuard.from_pretrained(args.model, device=args.device, dtype=dtype,
                                       kv_memory_gb=args.kv_memory_gb)
        app = create_gen_app(gen, served_model_name(args), api_key=api_key,
                             limits=limits_from_args(args))
    else:
        guard = StreamGuard.from_pretrained(args.model, device=args.device, dtype=dtype)
        app = create_app(Engine(guard, settings_from_args(args)), api_key=api_key,
                         limits=limits_from_args(args), open_docs=args.open_docs,
                         session_ttl_s=args.session_ttl,
                         served_model_name=served_model_name(args))
    settle_heap()  # the model and the app are built: exempt them from full GC passes
    # Frames over --max-frame-bytes get a 'too_large' error frame; past uvicorn's own bound
    # (16 MiB, or the limit if larger) the WebSocket layer closes the connection (1009).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                ws_max_size=max(16 << 20, args.max_frame_bytes + 1))
    return 0


def run_ray(args: argparse.Namespace) -> int:
    """Deploy on Ray Serve (an existing cluster, or a local one) and wait until interrupted;
    the application is deleted on the way out."""
    try:
        import ray
        from ray import serve

        from qguard_stream.deploy.ray import build_app
    except ImportError as err:
        print(f"error: 'serve --ray' needs the ray extra: {err} (pip install "
              f"'qguard-stream[ray]')", file=sys.stderr)
        return 2
    app = build_app(args.model, replicas=args.replicas, autoscale=args.autoscale,
                    num_gpus_per_replica=args.num_gpus_per_replica,
                    num_cpus_per_replica=args.num_cpus_per_replica,
                    target_ongoing_requests=args.target_ongoing_requests,
                    api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                    device=args.device, dtype=args.dtype, torch_threads=args.torch_threads,
                    settings=settings_from_args(args), limits=limits_from_args(args),
                    session_ttl_s=args.session_ttl, drain_timeout_s=args.drain_timeout)
    ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS"),
             include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="qguard-stream", route_prefix="/")
    print(f"qguard-stream on Ray Serve at http://{args.host}:{args.port} "
          f"(WebSocket ws://{args.host}:{args.port}/v1/stream)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a stop request deletes the app like Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete("qguard-stream")
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qguard-stream serve", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
