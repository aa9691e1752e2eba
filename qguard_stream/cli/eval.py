"""`qguard-stream eval`: the official evaluation over a local JSONL file, for Stream or Gen.

Writes per-sample predictions to --output (resumable: rerun the same command after an
interruption), then prints Unsafe F1 / precision / recall in strict and loose modes and, for Stream
response data with marked spans, the detection-latency bins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qguard_stream.cli.models import add_model_arguments, load_guard
from qguard_stream.eval.harness import (
    DATA_TYPES,
    format_report,
    gen_predictor,
    read_samples,
    run_eval,
    stream_predictor,
    summarize,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--input", required=True, type=Path,
                        help="JSONL in the Qwen3GuardTest layout (message, label, optional "
                             "unsafe_start_index / unsafe_end_index)")
    parser.add_argument("--output", required=True, type=Path,
                        help="per-sample predictions (JSONL); existing lines are kept and skipped")
    parser.add_argument("--data-type", required=True, choices=DATA_TYPES,
                        help="moderate the prompt (last user turn) or the response")
    parser.add_argument("--thinking", action="store_true",
                        help="stream: score the response from right after <think>")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="gen: decoding budget")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="gen: conversations decoded together (stream scores one at a time)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh instead of resuming from --output")
    parser.add_argument("--report", type=Path, default=None, help="also write the metrics as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    samples = read_samples(args.input)
    kind, guard = load_guard(args.model, args.kind, args.device, args.dtype)
    if kind == "stream":
        predictor = stream_predictor(guard, args.data_type, args.thinking)
    else:
        predictor = gen_predictor(guard, args.data_type, args.max_new_tokens)
    if args.overwrite and args.output.exists():
        args.output.unlink()
    records = run_eval(samples, predictor, args.output, args.data_type,
                       progress=not args.no_progress,
                       batch_size=args.batch_size if kind == "gen" else 1)
    report = summarize(records)
    print(format_report(report))
    if args.report is not None:
        args.report.write_text(json.dumps(report.to_dict(), indent=2))
    return 0
