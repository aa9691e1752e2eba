"""Qwen3Guard-Gen: moderation by generation. GenGuard (guard.py) loads the causal LM
(causal_lm.py), decodes greedily one conversation or a batch (decode.py) and parses the
"Safety / Categories / Refusal" text (parse.py)."""

from qguard_stream.gen.guard import GenGuard
from qguard_stream.gen.parse import GenVerdict, parse_gen_output

__all__ = ["GenGuard", "GenVerdict", "parse_gen_output"]
