"""`qguard-stream proxy`: an OpenAI-compatible server in front of any OpenAI-compatible LLM that
moderates prompts and streamed responses with Qwen3Guard-Stream (see qguard_stream.proxy.app).
Needs the server extra.

    qguard-stream proxy --upstream http://127.0.0.1:8001/v1 --model Qwen/Qwen3Guard-Stream-0.6B
    qguard-stream proxy --upstream http://127.0.0.1:8001/v1 --guard-url ws://guard-box:8000
"""

from __future__ import annotations

import argparse
import os
import sys

from qguard_stream.cli.serve import API_KEY_ENV

UPSTREAM_KEY_ENV = "QGUARD_STREAM_UPSTREAM_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `qguard-stream proxy`."""
    parser.add_argument("--upstream", required=True,
                        help="the OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1")
    guard = parser.add_mutually_exclusive_group(required=True)
    guard.add_argument("--model", help="guard checkpoint directory or hub id (run in-process)")
    guard.add_argument("--guard-url", help="a running `qguard-stream serve` or its Ray Serve "
                                           "deployment, e.g. ws://guard-box:8000")
    parser.add_argument("--guard-api-key", default=None, help="the guard server's --api-key")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--upstream-api-key", default=None,
                        help=f"sent to the upstream (default: ${UPSTREAM_KEY_ENV}; without one "
                             f"and without --api-key the client's own key is passed on)")
    parser.add_argument("--holdback", type=int, default=2,
                        help="tokens scored after a token before its text is released")
    parser.add_argument("--policy", default="official",
                        help="official | strict | threshold:P (per request: x-qguard-policy)")
    parser.add_argument("--prompt-flag", choices=("completion", "error"), default="completion",
                        help="a flagged prompt gets a content_filter completion or a 400")
    parser.add_argument("--fail-open", action="store_true",
                        help="if the guard fails, forward unguarded (default: fail closed)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--kv-memory-gb", type=float, default=None, help="KV pool size in GiB")
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    """Load the guard and serve the proxy until interrupted."""
    try:
        import uvicorn

        from qguard_stream.proxy.app import create_proxy_app
    except ImportError as err:
        print(f"error: 'proxy' needs the server extra: {err} (pip install 'qguard-stream[server]')",
              file=sys.stderr)
        return 2
    from qguard_stream.engine import Engine, EngineSettings, settle_heap
    from qguard_stream.stream import StreamGuard

    engine = None
    if args.model is not None:
        guard = StreamGuard.from_pretrained(args.model, device=args.device)
        settings = EngineSettings(kv_memory_gb=args.kv_memory_gb) if args.kv_memory_gb else None
        engine = Engine(guard, settings)
    try:
        app = create_proxy_app(
            engine, args.upstream, guard_url=args.guard_url, guard_api_key=args.guard_api_key,
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            upstream_api_key=args.upstream_api_key or os.environ.get(UPSTREAM_KEY_ENV) or None,
            holdback=args.holdback, policy=args.policy, prompt_flag=args.prompt_flag,
            fail_open=args.fail_open)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settle_heap()  # the app (and any in-process guard) is built: exempt it from full GC passes
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
