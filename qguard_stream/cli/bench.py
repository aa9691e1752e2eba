"""`qguard-stream bench`: the latency benchmark (benchmarks/latency.py), which lives in the source
checkout, not in the wheel. Run it from the checkout's root (or `python -m benchmarks.latency`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType


def _latency() -> ModuleType | None:
    """benchmarks.latency, found on sys.path or in the current directory (a console script does
    not put the working directory on sys.path)."""
    try:
        return importlib.import_module("benchmarks.latency")
    except ImportError:
        if not (Path.cwd() / "benchmarks" / "latency.py").is_file():
            return None
    sys.path.insert(0, str(Path.cwd()))
    return importlib.import_module("benchmarks.latency")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    latency = _latency()
    if latency is None:  # accept any arguments: run() explains what is missing
        parser.set_defaults(accepts_any_arguments=True)
        return
    latency.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    latency = _latency()
    if latency is None:
        print("error: 'bench' runs from a source checkout: cd into the repository (the folder "
              "holding benchmarks/) and run `qguard-stream bench` or `python -m "
              "benchmarks.latency`", file=sys.stderr)
        return 2
    return latency.run(args)
