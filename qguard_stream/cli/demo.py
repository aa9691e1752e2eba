"""`qguard-stream demo`: stream a conversation through the guard, token by token, live.

Without --model it builds (once, in the user cache) a random checkpoint whose heads are rigged to
flag known words, so the printout shows transitions and a policy stop where a reader expects them.
"""

from __future__ import annotations

import argparse
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
DEMO_UNSAFE = " crack it offline"  # the demo checkpoint flags these tokens Unsafe...
DEMO_CONTROVERSIAL = " password"  # ...and these Controversial
DEMO_SHAPE = "tiny"
DEMO_CACHE_VERSION = "v2"

def cache_dir() -> Path:
    """Per-user cache root (XDG_CACHE_HOME or ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qguard_stream"


def demo_checkpoint() -> Path:
    """The demo's random checkpoint, built once under the user cache dir (atomically).

    Its backbone is random, but its heads are engineered (make_trigger_checkpoint) so that the
    tokens of DEMO_UNSAFE read Unsafe and those of DEMO_CONTROVERSIAL Controversial: the demo then
    shows transitions and a policy stop where a reader expects them."""
    from qguard_stream.assets import tokenizer_dir
    from qguard_stream.checkpoints import make_trigger_checkpoint

    target = cache_dir() / f"demo-{DEMO_SHAPE}-{DEMO_CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"building a random demo checkpoint in {target} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    unsafe = tokenizer.encode(DEMO_UNSAFE, add_special_tokens=False)
    controversial = tokenizer.encode(DEMO_CONTROVERSIAL, add_special_tokens=False)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        make_trigger_checkpoint(staging, unsafe, controversial, category=6, shape=DEMO_SHAPE)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # lost a race to another process: fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or Hugging Face repo id "
                        "(default: a random checkpoint built once in the user cache)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--prompt", default=DEMO_PROMPT, help="the user message")
    parser.add_argument("--response", default=DEMO_RESPONSE, help="the assistant message, streamed")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds to pause between streamed tokens (to watch it live)")


def run(args: argparse.Namespace) -> int:
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
        print(f"Its heads are rigged to call {DEMO_UNSAFE.strip()!r} Unsafe and "
              f"{DEMO_CONTROVERSIAL.strip()!r}")
        print("Controversial, to show transitions and a stop. Real verdicts:")
        print("  qguard-stream demo --model Qwen/Qwen3Guard-Stream-0.6B")
        print("=" * 78)
    dtype = str(guard.dtype).removeprefix("torch.")
    print(f"model: {path} ({guard.config.num_hidden_layers} layers, hidden "
          f"{guard.config.hidden_size}) on {guard.device}, {dtype}")
    stream_conversation(guard, args.prompt, args.response, args.delay)
    return 0


def stream_conversation(guard, prompt: str, response: str, delay: float) -> None:
    """Score the prompt, then stream the response token by token under the official policy;
    transitions and the flag are reported by callbacks, and the stream stops at the flag."""
    from qguard_stream.hooks import Hooks, attach
    from qguard_stream.policy import ConsecutiveUnsafe
    from qguard_stream.template import conversation_spans

    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    spans = conversation_spans(guard.tokenizer, messages)
    ids = spans.token_ids
    notes: list[str] = []
    hooks = Hooks()
    hooks.on_transition(lambda e: notes.append(f"<-- transition {e.previous_level} -> {e.level}"))
    hooks.on_flag(lambda e: notes.append(f"<-- FLAG {e.decision.label} ({e.decision.rule})"))
    state = guard.open_stream()
    try:
        verdict = guard.moderate(state, ids[: spans.user_end + 1], "user")
        print(f"\nprompt: {prompt!r}\n  -> {_describe(verdict, -1)}")
        guard.moderate(state, ids[spans.user_end + 1: spans.response_start], "assistant")
        monitor = attach(state, ConsecutiveUnsafe(), hooks)
        print("\nresponse, token by token (official rule: stop at two consecutive Unsafe):")
        for position in range(spans.response_start, len(ids)):
            notes.clear()
            started = time.perf_counter()
            verdict = guard.moderate(state, ids[position], "assistant")
            elapsed_ms = 1000 * (time.perf_counter() - started)
            text = guard.tokenizer.decode([ids[position]])
            print(f"  {position:4d} {text!r:>14}  {_describe(verdict, 0)}  [{elapsed_ms:5.1f} ms]  "
                  + "  ".join(notes))
            decision = monitor.stop_decision
            if decision is not None:
                withheld = guard.tokenizer.decode(ids[position + 1:])
                print(f"\nSTOPPED at position {decision.position}: {decision.label}, category "
                      f"{decision.category}. Withheld from the user: {withheld!r}")
                break
            if delay:
                time.sleep(delay)
        else:
            print("\nresponse completed: no flag")
    finally:
        guard.close_stream(state)


def _describe(verdicts, index: int) -> str:
    level = verdicts.risk_level[index]
    text = f"{level:<13} p={verdicts.risk_prob[index]:.2f}"
    if level != "Safe":
        text += f"  {verdicts.category[index]}"
    return text
