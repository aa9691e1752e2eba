"""The official evaluation over Qwen3GuardTest-layout JSONL, for Stream and Gen (harness.py)."""
