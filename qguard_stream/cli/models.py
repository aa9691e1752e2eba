"""Which of the two Qwen3Guard systems a checkpoint holds, and loading it for the CLIs.

A Stream checkpoint is `Qwen3ForGuardModel` (guard heads, `guard_inner_size` in config.json); a Gen
checkpoint is a plain `Qwen3ForCausalLM`. Nothing here runs a model.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from qguard_stream.config import read_config_json
from qguard_stream.loader import CheckpointError, resolve_checkpoint

KINDS = ("auto", "stream", "gen")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def detect_kind(path_or_id: str | os.PathLike[str]) -> str:
    """"stream" or "gen", from the checkpoint's config.json."""
    directory = resolve_checkpoint(path_or_id)
    raw = read_config_json(directory / "config.json")
    architectures = raw.get("architectures") or []
    if "Qwen3ForGuardModel" in architectures or "guard_inner_size" in raw:
        return "stream"
    if "Qwen3ForCausalLM" in architectures:
        return "gen"
    raise CheckpointError(f"{directory} is neither a Qwen3Guard-Stream (Qwen3ForGuardModel) nor a "
                          f"Qwen3Guard-Gen (Qwen3ForCausalLM) checkpoint: architectures "
                          f"{architectures!r}; pass --kind to force one")


def load_guard(path_or_id: str, kind: str = "auto", device: str | None = None,
               dtype: str | None = None) -> tuple[str, Any]:
    """(kind, StreamGuard or GenGuard) for a checkpoint."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    kind = detect_kind(path_or_id) if kind == "auto" else kind
    torch_dtype = DTYPES[dtype] if dtype else None
    if kind == "stream":
        from qguard_stream.stream import StreamGuard

        return kind, StreamGuard.from_pretrained(path_or_id, device=device, dtype=torch_dtype)
    from qguard_stream.gen.guard import GenGuard

    return kind, GenGuard.from_pretrained(path_or_id, device=device, dtype=torch_dtype)


def add_model_arguments(parser: Any) -> None:
    """--model / --kind / --device / --dtype, shared by the eval and moderate subcommands."""
    parser.add_argument("--model", required=True,
                        help="checkpoint directory or Hugging Face repo id")
    parser.add_argument("--kind", choices=KINDS, default="auto",
                        help="stream (Qwen3Guard-Stream) or gen (Qwen3Guard-Gen); auto reads "
                             "config.json")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
