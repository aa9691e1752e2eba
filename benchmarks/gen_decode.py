"""Gen greedy decoding on the paged runner: one sequence per generate call vs all of them in one
call (continuously batched: one step for every running sequence).

Usage: PYTHONPATH=. python benchmarks/gen_decode.py [--shape small] [--rows 8] [--new 32]
Random weights; the two paths must produce the same ids (checked), only the time differs.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from qguard_stream.checkpoints import make_random_gen_checkpoint
from qguard_stream.gen.guard import GenGuard


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="small")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    directory = make_random_gen_checkpoint(tempfile.mkdtemp(), args.shape, seed=3, tied=False)
    guard = GenGuard.from_pretrained(directory, device=args.device)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150000, (180 + 10 * row,), generator=generator).tolist()
               for row in range(args.rows)]
    results = {}
    def one_at_a_time(prompts: list[list[int]], new: int) -> list[list[int]]:
        return [guard.decoder.generate([ids], new, frozenset())[0] for ids in prompts]

    def batched(prompts: list[list[int]], new: int) -> list[list[int]]:
        return guard.decoder.generate(prompts, new, frozenset())

    for name, decode in (("one at a time", one_at_a_time), ("batched", batched)):
        decode(prompts[:1], 2)  # warm-up
        start = time.perf_counter()
        results[name] = decode(prompts, args.new)
        seconds = time.perf_counter() - start
        tokens = sum(map(len, results[name]))
        print(f"{name:>14}: {seconds:7.2f} s for {tokens} tokens ({tokens / seconds:.1f} tok/s)")
    print("same ids:", results["one at a time"] == results["batched"])


if __name__ == "__main__":
    main()
