"""Benchmarks for qguard_stream (run from the repository root: `python -m benchmarks.latency`)."""
