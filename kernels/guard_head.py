"""The fused guard head in Triton: projection -> RMSNorm -> two heads -> softmax -> winners.

One program scores a block of 16 rows: it streams the [inner, H] projection weight over H tiles
into an fp32 accumulator holding the rows' whole inner vector (512 wide) in registers, normalises
it, runs the two tiny heads (3 and 8/9 classes: one row-sum per class, softmax over a masked
16-wide tile) and writes only the probabilities and the winners.

Cast points follow the plain-PyTorch formula in `reference.py` (each linear's output rounded to
the input dtype, Qwen3RMSNorm casting the normalised value before the weight), so bf16 results
match the bf16 torch path, not just the exact math. Known limit: k <= 16 rows is one program, so
one SM streams the whole weight (a split-H variant would spread small k over the GPU).
No dispatch here: callers choose between this and the reference. Runs on CUDA tensors, or on CPU
tensors when imported under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from qguard_stream.kernels.reference import FUSED_DTYPES, GuardHeadOutput
from qguard_stream.kernels.triton_common import round_to

MAX_INNER = 1024  # the accumulator is [BLOCK_ROWS, inner] fp32 in registers
ROWS_PER_PROGRAM = 16  # the smallest tl.dot M; rows beyond k are masked
# H tile per dtype: 3 pipeline stages of the [tile, 512] weight slice take ~66 KB of shared memory,
# which fits sm_80/86/89/90. Checked by compiling for sm_90 and sm_80 (no register spills); speed
# not measured on a GPU yet.
HIDDEN_TILE = {torch.bfloat16: 32, torch.float16: 32, torch.float32: 16}
# enable_fp_fusion pinned: Triton 3.10 flips its default
LAUNCH_OPTIONS = {"num_warps": 8, "num_stages": 3, "enable_fp_fusion": True}
MAX_CLASSES = 16  # both heads' probabilities are computed in one 16-wide tile
# triton.jit picks interpreted or compiled when this module is imported; the launcher follows suit.
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def _dot(a, b, acc, DOT_IN_FP32: tl.constexpr):
    """a @ b + acc in fp32. DOT_IN_FP32 upcasts the operands first: the same value (bf16/fp16
    products are exact in fp32), needed because the interpreter multiplies bf16 bit patterns
    (triton-lang/triton#11584); compiled kernels keep the input dtype for the tensor cores."""
    if DOT_IN_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _softmax_head(inner, w_ptr, stride_w_row, probs_ptr, ids_ptr, max_ptr, row, row_ok, col,
                  col_ok, NUM_CLASSES: tl.constexpr, BLOCK_CLASSES: tl.constexpr):
    """One linear head on the normalised rows, then fp32 softmax, argmax and max probability.

    A few classes: one multiply-and-row-sum per class (unrolled) rather than a padded tl.dot,
    whose operand layouts would hold the 512-long dimension per thread and spill."""
    cls = tl.arange(0, BLOCK_CLASSES)
    logits = tl.full([inner.shape[0], BLOCK_CLASSES], float("-inf"), tl.float32)
    for c in tl.static_range(NUM_CLASSES):
        w = tl.load(w_ptr + c * stride_w_row + col, mask=col_ok, other=0.0).to(tl.float32)
        logit = tl.sum(inner * w[None, :], axis=1)
        # F.linear returns the input dtype; the reference softmaxes that rounded value in fp32.
        rounded = round_to(logit, w_ptr.dtype.element_ty)
        logits = tl.where(cls[None, :] == c, rounded[:, None], logits)
    exp = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = exp / tl.sum(exp, axis=1)[:, None]
    tl.store(probs_ptr + row[:, None] * NUM_CLASSES + cls[None, :], probs,
             mask=row_ok[:, None] & (cls[None, :] < NUM_CLASSES))
    tl.store(max_ptr + row, tl.max(probs, axis=1), mask=row_ok)
    tl.store(ids_ptr + row, tl.argmax(probs, axis=1).to(tl.int64), mask=row_ok)


@triton.jit
def _guard_head_kernel(
    hidden_ptr, pre_w_ptr, norm_w_ptr, risk_w_ptr, cat_w_ptr,
    risk_probs_ptr, cat_probs_ptr, risk_ids_ptr, cat_ids_ptr, risk_max_ptr, cat_max_ptr,
    rows, hidden_size, inner_size, eps,
    stride_hidden_row, stride_pre_row, stride_risk_row, stride_cat_row,
    BLOCK_ROWS: tl.constexpr, BLOCK_HIDDEN: tl.constexpr, BLOCK_INNER: tl.constexpr,
    NUM_RISK: tl.constexpr, NUM_CAT: tl.constexpr, BLOCK_CLASSES: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = row < rows
    col = tl.arange(0, BLOCK_INNER)
    col_ok = col < inner_size
    acc = tl.zeros([BLOCK_ROWS, BLOCK_INNER], dtype=tl.float32)
    for start in range(0, hidden_size, BLOCK_HIDDEN):
        h = start + tl.arange(0, BLOCK_HIDDEN)
        h_ok = h < hidden_size
        x = tl.load(hidden_ptr + row[:, None] * stride_hidden_row + h[None, :],
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(pre_w_ptr + h[:, None] + col[None, :] * stride_pre_row,
                    mask=h_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_HIDDEN, inner]
        acc = _dot(x, w, acc, DOT_IN_FP32)
    dtype = hidden_ptr.dtype.element_ty
    proj = round_to(acc, dtype)  # the projection's output in the input dtype
    variance = tl.sum(proj * proj, axis=1) / inner_size
    normed = round_to(proj * tl.rsqrt(variance + eps)[:, None], dtype)  # Qwen3RMSNorm's cast point
    norm_w = tl.load(norm_w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)
    inner = round_to(norm_w[None, :] * normed, dtype)
    _softmax_head(inner, risk_w_ptr, stride_risk_row, risk_probs_ptr, risk_ids_ptr, risk_max_ptr,
                  row, row_ok, col, col_ok, NUM_RISK, BLOCK_CLASSES)
    _softmax_head(inner, cat_w_ptr, stride_cat_row, cat_probs_ptr, cat_ids_ptr, cat_max_ptr,
                  row, row_ok, col, col_ok, NUM_CAT, BLOCK_CLASSES)


def fused_guard_head(hidden: torch.Tensor, pre_w: torch.Tensor, norm_w: torch.Tensor,
                     risk_w: torch.Tensor, cat_w: torch.Tensor, eps: float,
                     block_hidden: int | None = None) -> GuardHeadOutput:
    """Score k rows in one kernel launch; same contract as `guard_head_reference`.

    hidden [k, H]; pre_w [inner, H]; norm_w [inner]; risk_w [R, inner]; cat_w [C, inner], all of
    one dtype (fp32, bf16 or fp16) on one device. Returns fp32 probabilities, int64 argmax ids and
    fp32 max probabilities. `block_hidden` (a power of two >= 16) overrides the H tile.
    """
    check_inputs(hidden, pre_w, norm_w, risk_w, cat_w)
    rows, inner_size = hidden.shape[0], pre_w.shape[0]
    hidden, pre_w, norm_w, risk_w, cat_w = (
        t.contiguous() for t in (hidden, pre_w, norm_w, risk_w, cat_w))
    output = empty_output(rows, risk_w.shape[0], cat_w.shape[0], hidden.device)
    if rows == 0:
        return output
    grid = (triton.cdiv(rows, ROWS_PER_PROGRAM),)
    constants = kernel_constants(hidden.dtype, inner_size, risk_w.shape[0], cat_w.shape[0],
                                 block_hidden)
    _guard_head_kernel[grid](
        hidden, pre_w, norm_w, risk_w, cat_w,
        output.risk_probs, output.category_probs, output.risk_ids, output.category_ids,
        output.risk_max, output.category_max,
        rows, hidden.shape[1], inner_size, float(eps),
        hidden.stride(0), pre_w.stride(0), risk_w.stride(0), cat_w.stride(0),
        **constants, **LAUNCH_OPTIONS,
    )
    return output


def kernel_constants(dtype: torch.dtype, inner_size: int, num_risk: int, num_cat: int,
                     block_hidden: int | None = None) -> dict[str, int | bool]:
    """The kernel's constexpr arguments for one head shape and dtype."""
    return {
        "BLOCK_ROWS": ROWS_PER_PROGRAM, "BLOCK_HIDDEN": block_hidden or HIDDEN_TILE[dtype],
        "BLOCK_INNER": max(16, triton.next_power_of_2(inner_size)),
        "NUM_RISK": num_risk, "NUM_CAT": num_cat, "BLOCK_CLASSES": MAX_CLASSES,
        "DOT_IN_FP32": INTERPRETED,
    }


def empty_output(rows: int, num_risk: int, num_cat: int, device: torch.device) -> GuardHeadOutput:
    def floats(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32, device=device)

    def ids() -> torch.Tensor:
        return torch.empty(rows, dtype=torch.int64, device=device)

    return GuardHeadOutput(floats(rows, num_risk), floats(rows, num_cat), ids(), ids(),
                           floats(rows), floats(rows))


def check_inputs(hidden: torch.Tensor, pre_w: torch.Tensor, norm_w: torch.Tensor,
                 risk_w: torch.Tensor, cat_w: torch.Tensor) -> None:
    """Raise ValueError naming the offending tensor when the kernel cannot take these inputs."""
    if hidden.dim() != 2 or pre_w.dim() != 2 or pre_w.shape[1] != hidden.shape[1]:
        raise ValueError(f"expected hidden [k, H] and pre_w [inner, H], got hidden "
                         f"{tuple(hidden.shape)} and pre_w {tuple(pre_w.shape)}")
    inner_size = pre_w.shape[0]
    if inner_size > MAX_INNER or tuple(norm_w.shape) != (inner_size,):
        raise ValueError(f"expected inner <= {MAX_INNER} and norm_w [{inner_size}], got pre_w "
                         f"{tuple(pre_w.shape)} and norm_w {tuple(norm_w.shape)}")
    for name, head in (("risk_w", risk_w), ("cat_w", cat_w)):
        if head.dim() != 2 or head.shape[1] != inner_size or not 0 < head.shape[0] <= MAX_CLASSES:
            raise ValueError(f"expected {name} [classes <= {MAX_CLASSES}, {inner_size}], "
                             f"got {tuple(head.shape)}")
    tensors = {"hidden": hidden, "pre_w": pre_w, "norm_w": norm_w, "risk_w": risk_w, "cat_w": cat_w}
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if hidden.dtype not in FUSED_DTYPES or len(set(dtypes.values())) != 1:
        raise ValueError(f"expected one dtype among {FUSED_DTYPES} for all inputs, got {dtypes}")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"expected all inputs on one device, got {devices}")
    if hidden.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the fused guard head needs CUDA tensors (or TRITON_INTERPRET=1 when "
                         f"this module is imported), got {hidden.device}")
