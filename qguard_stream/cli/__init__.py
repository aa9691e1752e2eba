"""The `qguard-stream` command: one module per subcommand, wired here.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`, and imports nothing
optional at module level: a missing extra (fastapi for `serve`, the source checkout's benchmarks/
for `bench`) is reported by its `run`, whatever the arguments. This file holds no moderation logic.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qguard_stream.config import ConfigError
from qguard_stream.loader import CheckpointError

# subcommand -> (module, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("qguard_stream.cli.demo", "stream a conversation through the guard, live"),
    "serve": ("qguard_stream.cli.serve", "serve sessions over WebSocket/HTTP (batched engine)"),
    "proxy": ("qguard_stream.cli.proxy", "guard any OpenAI-compatible LLM (an OpenAI proxy)"),
    "eval": ("qguard_stream.cli.eval", "evaluate a Stream or Gen model on Qwen3GuardTest JSONL"),
    "moderate": ("qguard_stream.cli.moderate", "moderate one prompt (and response) from the shell"),
    "bench": ("qguard_stream.cli.bench", "latency vs the card loop and transformers (a checkout)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qguard-stream",
                                     description="Qwen3Guard-Stream as a token-streaming guardrail")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:  # a broken install: say so when the subcommand is used
            sub = commands.add_parser(name, help=f"{help_text} [unavailable: {err}]")
            sub.set_defaults(handler=_unavailable(name, err), accepts_any_arguments=True)
            continue
        sub = commands.add_parser(name, help=help_text, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def _unavailable(name: str, err: ImportError):
    def handler(_: argparse.Namespace) -> int:
        print(f"error: '{name}' is unavailable here: {err}", file=sys.stderr)
        return 2
    return handler


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.handler(args) or 0)
    except (CheckpointError, ConfigError) as error:  # a user's path or file: one line, no trace
        print(f"error: {error}", file=sys.stderr)
        return 2
