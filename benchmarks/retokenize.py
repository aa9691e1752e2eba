"""Cost of incremental re-tokenization (IncrementalTokenizer.push) on CPU.

Feeds a long text in small deltas and reports microseconds per push, the largest held-back window,
and how the per-push cost compares with tokenizing the whole text once. Checks the ids on the way.

    PYTHONPATH=$PWD python benchmarks/retokenize.py --chars 20000 --delta 4
"""

from __future__ import annotations

import argparse
import time

from transformers import AutoTokenizer

from qguard_stream.assets import tokenizer_dir
from qguard_stream.integrations.retokenize import IncrementalTokenizer

SAMPLE = ("The model streams its answer, token by token; we re-tokenize it. It's 2026: "
          "numbers like 3.14159 and 1,000,000 appear, code `x = f(y)\n    return x`, "
          "混合的中文文本，和 emoji 👩\u200d👩\u200d👧 and café.\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=20000, help="length of the streamed text")
    parser.add_argument("--delta", type=int, default=4, help="characters per delta")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    text = (SAMPLE * (args.chars // len(SAMPLE) + 1))[: args.chars]
    deltas = [text[i:i + args.delta] for i in range(0, len(text), args.delta)]

    start = time.perf_counter()
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    one_shot_s = time.perf_counter() - start

    incremental = IncrementalTokenizer(tokenizer)
    ids: list[int] = []
    widest = 0
    start = time.perf_counter()
    for delta in deltas:
        ids += incremental.push(delta)
        widest = max(widest, len(incremental.pending_text))
    ids += incremental.flush()
    stream_s = time.perf_counter() - start
    assert ids == expected, "incremental ids differ from the one-shot tokenization"

    print(f"text {len(text)} chars, {len(expected)} tokens, {len(deltas)} deltas of "
          f"{args.delta} chars")
    print(f"one-shot tokenization: {one_shot_s * 1e3:.1f} ms")
    print(f"incremental: {stream_s * 1e3:.1f} ms total, {stream_s / len(deltas) * 1e6:.0f} us "
          f"per push, {stream_s / len(expected) * 1e6:.0f} us per token")
    print(f"widest held-back window: {widest} chars")


if __name__ == "__main__":
    main()
