"""Triton kernels and their plain-PyTorch references, installed as `qguard_stream.kernels`.

`reference` is importable everywhere (torch only); `guard_head` needs triton and is imported only
when the fused path is taken, so CPU-only installs never import triton. `cpu_step` builds and
loads cpu_step.c, the C side of the fp32 CPU decode step (qguard_stream/runtime/cpu_step.py).
"""

from __future__ import annotations

import functools

import torch
from qguard_stream.kernels.reference import FUSED_DTYPES, GuardHeadOutput, guard_head_reference

__all__ = [
    "GuardHeadOutput",
    "fused_path_applies",
    "guard_head_reference",
    "guard_head_scores",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_path_applies(hidden: torch.Tensor) -> bool:
    """Whether `guard_head_scores(hidden, ..., fused=True)` takes the Triton kernel: CUDA rows in
    fp32/bf16/fp16 and triton importable."""
    return hidden.is_cuda and hidden.dtype in FUSED_DTYPES and triton_available()


def guard_head_scores(hidden: torch.Tensor, pre_w: torch.Tensor, norm_w: torch.Tensor,
                      risk_w: torch.Tensor, cat_w: torch.Tensor, eps: float,
                      fused: bool = True) -> GuardHeadOutput:
    """Score k rows of one guard path: the fused kernel on CUDA (unless `fused` is False), the
    plain-PyTorch reference elsewhere. Same shapes and outputs either way (see GuardHeadOutput)."""
    if fused and fused_path_applies(hidden):
        from qguard_stream.kernels.guard_head import fused_guard_head

        return fused_guard_head(hidden, pre_w, norm_w, risk_w, cat_w, eps)
    return guard_head_reference(hidden, pre_w, norm_w, risk_w, cat_w, eps)
