"""The `qguard-stream` command: demo, and the subcommands other modules register.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
this file only wires them. It must not hold any moderation logic beyond the demo's printing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

DEMO_PROMPT = "How do I get into my neighbour's wifi without them knowing?"
DEMO_RESPONSE = (
    "Sure. First find the router model, then try the default admin password printed on the label. "
    "If that fails, capture the handshake and crack it offline with a wordlist."
)
DEMO_SHAPE = "tiny"
DEMO_CACHE_VERSION = "v1"

# subcommand -> (module, help); modules are imported only when their subcommand runs or is listed.
SUBCOMMANDS: dict[str, tuple[str, str]] = {}


def cache_dir() -> Path:
    """Per-user cache root (XDG_CACHE_HOME or ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qguard_stream"


def demo_checkpoint() -> Path:
    """The demo's random checkpoint, built once under the user cache dir (atomically)."""
    from qguard_stream.testing import make_random_checkpoint

    target = cache_dir() / f"demo-{DEMO_SHAPE}-{DEMO_CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"building a random demo checkpoint in {target} (once)...", flush=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        make_random_checkpoint(staging, DEMO_SHAPE, seed=0)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # lost a race to another process: fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or Hugging Face repo id "
                        "(default: a random checkpoint built once in the user cache)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--prompt", default=DEMO_PROMPT, help="the user message")
    parser.add_argument("--response", default=DEMO_RESPONSE, help="the assistant message, streamed")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds to pause between streamed tokens (to watch it live)")


def run_demo(args: argparse.Namespace) -> int:
    from qguard_stream import StreamGuard

    random_weights = args.model is None
    path = demo_checkpoint() if random_weights else args.model
    guard = StreamGuard.from_pretrained(path, device=args.device)
    if guard.tokenizer is None:
        print(f"error: {path} has no tokenizer files; the demo needs one", file=sys.stderr)
        return 2
    if random_weights:
        print("=" * 78)
        print("RANDOM WEIGHTS: this checkpoint is random, so its verdicts are MEANINGLESS.")
        print("It shows the mechanics only. For real verdicts: --model Qwen/Qwen3Guard-Stream-0.6B")
        print("=" * 78)
    dtype = str(guard.dtype).removeprefix("torch.")
    print(f"model: {path} ({guard.config.num_hidden_layers} layers, hidden "
          f"{guard.config.hidden_size}) on {guard.device}, {dtype}")
    stream_conversation(guard, args.prompt, args.response, args.delay)
    return 0


def stream_conversation(guard, prompt: str, response: str, delay: float) -> None:
    """Score the prompt, then the response token by token, printing verdicts and transitions."""
    from qguard_stream.template import conversation_spans

    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    spans = conversation_spans(guard.tokenizer, messages)
    ids = spans.token_ids
    state = guard.open_stream()
    try:
        verdict = guard.moderate(state, ids[: spans.user_end + 1], "user")
        print(f"\nprompt: {prompt!r}\n  -> {_describe(verdict, -1)}\n\nresponse, token by token:")
        previous = None
        for position in range(spans.user_end + 1, len(ids)):
            started = time.perf_counter()
            verdict = guard.moderate(state, ids[position], "assistant")
            elapsed_ms = 1000 * (time.perf_counter() - started)
            level = verdict.risk_level[0]
            marker = ""
            if previous is not None and level != previous and position >= spans.response_start:
                marker = f"   <-- transition {previous} -> {level}"
            if position >= spans.response_start:
                previous = level
            text = guard.tokenizer.decode([ids[position]])
            print(f"  {position:4d} {text!r:>18}  {_describe(verdict, 0)}  "
                  f"[{elapsed_ms:5.1f} ms]{marker}")
            if delay:
                time.sleep(delay)
    finally:
        guard.close_stream(state)


def _describe(verdicts, index: int) -> str:
    level = verdicts.risk_level[index]
    text = f"{level:<13} p={verdicts.risk_prob[index]:.2f}"
    if level != "Safe":
        text += f"  category={verdicts.category[index]}"
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qguard-stream",
                                     description="Qwen3Guard-Stream as a token-streaming guardrail")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="stream a conversation through the guard, live")
    add_demo_arguments(demo)
    demo.set_defaults(handler=run_demo)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
