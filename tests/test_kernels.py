"""The fused guard-head kernel against the plain-PyTorch formula.

On CPU the Triton kernel itself runs under Triton's interpreter, in one subprocess
(tests/interpreter.py), and this process compares. The kernel is also compiled for sm_80/sm_90
here (no GPU needed), and on CUDA the compiled kernel is checked directly. The oracle is the
reference formula in float64 on the same dtype-rounded weights, plus the torch path in the
kernel's own dtype.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from qguard_stream.kernels import GuardHeadOutput, guard_head_reference, guard_head_scores
from qguard_stream.kernels import guard_head as guard_head_module
from qguard_stream.kernels.guard_head import INTERPRETED, fused_guard_head

from qguard_stream import kernels
from qguard_stream.checkpoints import config_for
from qguard_stream.models.guard import GuardHead, GuardModel

from interpreter import run_interpreted

EPS = 1e-6
# Max |p - p64| / p64 over all probabilities: fp32 is exact math up to rounding. bf16/fp16 round
# every linear output at the torch path's cast points, so they must match that path's error; the
# slack allows a summation-order flip of one rounding (one bf16 logit ulp below |4| is 1/64).
FP32_RTOL = 1e-4
LOGIT_ULP_SLACK = 0.02
# Mean |p - p_torch| in bf16/fp16: ~1e-8 with the torch path's cast points, >= 3e-5 (bf16 >= 2.7e-4)
# when any one of them (projection, normalised value, logits) is skipped (measured on these cases).
SAME_CASTS_MEAN_DIFF = 2e-5
TOP2_TIE = {torch.float32: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.01}

# (hidden, inner, categories, rows, dtype): the real 0.6B (C=8 response) and 8B (C=9 query) head
# shapes at k = 1, 7, 64 in both dtypes across the set, the 4B width, an odd shape whose sizes are
# no multiple of any block (inner not a power of two, rows spanning three row blocks), zero rows.
CASES = [
    (1024, 512, 8, 1, torch.float32),
    (1024, 512, 8, 7, torch.bfloat16),
    (1024, 512, 8, 64, torch.float32),
    (4096, 512, 9, 1, torch.bfloat16),
    (4096, 512, 9, 7, torch.float32),
    (4096, 512, 9, 64, torch.bfloat16),
    (2560, 512, 9, 7, torch.bfloat16),
    (200, 48, 9, 33, torch.float32),
    (200, 48, 9, 33, torch.float16),
    (64, 32, 9, 0, torch.float32),
]

# Runs in a fresh interpreter-mode process: inputs in, kernel outputs out, plus proof that the
# Triton kernel (not a fallback) ran interpreted.
WORKER = """
import sys, dataclasses, torch
from triton.runtime.interpreter import InterpretedFunction
from qguard_stream.kernels import guard_head
cases = torch.load(sys.argv[1])
outputs = [dataclasses.asdict(guard_head.fused_guard_head(*inputs, eps, block_hidden=tile))
           for inputs, eps, tile in cases]
kernel = guard_head._guard_head_kernel
torch.save({"interpreted": guard_head.INTERPRETED and isinstance(kernel, InterpretedFunction),
            "outputs": outputs}, sys.argv[2])
"""


def head_inputs(hidden_size: int, inner: int, categories: int, rows: int,
                seed: int) -> tuple[torch.Tensor, ...]:
    """fp32 rows and weights scaled like a trained head: logits of a few units, so softmaxes are
    neither flat nor saturated; some rows have large norms like real final hidden states."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=gen)
    hidden *= torch.where(torch.rand(rows, 1, generator=gen) < 0.3, 40.0, 2.0)
    pre_w = torch.randn(inner, hidden_size, generator=gen) / hidden_size**0.5
    norm_w = 1 + 0.2 * torch.randn(inner, generator=gen)
    risk_w = 2.5 * torch.randn(3, inner, generator=gen) / inner**0.5
    cat_w = 2.5 * torch.randn(categories, inner, generator=gen) / inner**0.5
    return hidden, pre_w, norm_w, risk_w, cat_w


def probability_pairs(out: GuardHeadOutput, ref: GuardHeadOutput):
    return ((out.risk_probs, ref.risk_probs), (out.category_probs, ref.category_probs))


def max_rel_error(probs: torch.Tensor, exact: torch.Tensor) -> float:
    return ((probs.double() - exact) / exact).abs().max().item()


def assert_winners_agree(out: GuardHeadOutput, exact: GuardHeadOutput, tie: float) -> None:
    """Same argmax wherever the exact top two are further apart than `tie`; max = probs[argmax]."""
    for probs, ids, best, exact_probs in (
        (out.risk_probs, out.risk_ids, out.risk_max, exact.risk_probs),
        (out.category_probs, out.category_ids, out.category_max, exact.category_probs),
    ):
        assert ids.dtype == torch.int64 and best.dtype == torch.float32
        assert torch.equal(best, probs.gather(1, ids[:, None])[:, 0])
        assert torch.equal(ids, probs.argmax(dim=1))
        top2 = exact_probs.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > tie
        assert torch.equal(ids[clear], exact_probs.argmax(dim=1)[clear])


def case_inputs(case: tuple) -> list[torch.Tensor]:
    hidden_size, inner, categories, rows, dtype = case
    return [t.to(dtype) for t in head_inputs(hidden_size, inner, categories, rows, seed=rows)]


def interpreter_tile(case: tuple) -> int | None:
    """The interpreter's cost is per tile, so the real widths run 128-wide H tiles; the odd shape
    runs the default tiles (with masked edges)."""
    return 128 if case[0] >= 1024 else None


@pytest.fixture(scope="module")
def interpreted_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every CASES input through the kernel under TRITON_INTERPRET=1, in one subprocess."""
    cases = [(case_inputs(case), EPS, interpreter_tile(case)) for case in CASES]
    return run_interpreted(WORKER, cases, tmp_path_factory.mktemp("interpreted"), timeout=300)


def test_interpreter_really_runs_the_triton_kernel(interpreted_run: dict) -> None:
    assert interpreted_run["interpreted"] is True


def case_id(case: tuple) -> str:
    hidden_size, inner, categories, rows, dtype = case
    return f"H{hidden_size}-inner{inner}-C{categories}-k{rows}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_interpreted_kernel_matches_reference(interpreted_run: dict, case: tuple) -> None:
    _, _, categories, rows, dtype = case
    inputs = case_inputs(case)
    out = GuardHeadOutput(**interpreted_run["outputs"][CASES.index(case)])
    same_dtype = guard_head_reference(*inputs, EPS)
    exact = guard_head_reference(*[t.double() for t in inputs], EPS)
    assert out.risk_probs.shape == (rows, 3) and out.category_probs.shape == (rows, categories)
    assert out.risk_probs.dtype == out.category_probs.dtype == torch.float32
    if rows:
        assert_close_to_exact(out, same_dtype, exact, dtype)
    assert_winners_agree(out, exact, TOP2_TIE[dtype])


def assert_close_to_exact(out: GuardHeadOutput, same_dtype: GuardHeadOutput,
                          exact: GuardHeadOutput, dtype: torch.dtype) -> None:
    for (probs, exact_probs), (torch_probs, _) in zip(probability_pairs(out, exact),
                                                      probability_pairs(same_dtype, exact)):
        if dtype == torch.float32:
            assert max_rel_error(probs, exact_probs) < FP32_RTOL
        else:  # the torch path's rounding, give or take one low-precision logit ulp
            torch_error = max_rel_error(torch_probs, exact_probs)
            assert max_rel_error(probs, exact_probs) <= torch_error + LOGIT_ULP_SLACK
            assert (probs - torch_probs).abs().max().item() < LOGIT_ULP_SLACK
            assert (probs - torch_probs).abs().mean().item() < SAME_CASTS_MEAN_DIFF


TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def arg_type(name: str, dtype: torch.dtype, constants: dict) -> str:
    if name in constants:
        return "constexpr"
    if name.endswith("_ids_ptr"):
        return "*i64"
    if name.endswith(("_probs_ptr", "_max_ptr")):
        return "*fp32"
    if name.endswith("_ptr"):
        return f"*{TORCH_TO_TRITON[dtype]}"
    return "fp32" if name == "eps" else "i32"


def compile_for_gpu(dtype: torch.dtype, arch: int, categories: int):
    """Compile the kernel ahead of time, as its first CUDA launch would (pointers and strides
    specialised as 16-divisible), for a GPU this machine need not have."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = guard_head_module._guard_head_kernel
    names = kernel.arg_names
    constants = guard_head_module.kernel_constants(dtype, 512, 3, categories)
    signature = {name: arg_type(name, dtype, constants) for name in names}
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride")]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=guard_head_module.LAUNCH_OPTIONS)


@pytest.mark.parametrize(("dtype", "arch", "categories"),
                         [(torch.bfloat16, 90, 9), (torch.float32, 80, 8)])
def test_kernel_compiles_for_gpus_within_shared_memory(dtype: torch.dtype, arch: int,
                                                       categories: int) -> None:
    """The compiler accepts what the interpreter ran; the pipelined tiles fit an RTX-class SM."""
    compiled = compile_for_gpu(dtype, arch, categories)
    assert compiled.asm["cubin"]
    assert compiled.metadata.shared <= 99 * 1024


def test_mixed_dtypes_are_rejected_by_name() -> None:
    hidden, pre_w, norm_w, risk_w, cat_w = head_inputs(64, 32, 9, 2, seed=0)
    with pytest.raises(ValueError, match="cat_w"):
        fused_guard_head(hidden, pre_w, norm_w, risk_w, cat_w.double(), EPS)


def test_wrong_head_width_is_rejected_by_name() -> None:
    hidden, pre_w, norm_w, risk_w, cat_w = head_inputs(64, 32, 9, 2, seed=0)
    with pytest.raises(ValueError, match=r"risk_w \[classes <= 16, 32\], got \(3, 31\)"):
        fused_guard_head(hidden, pre_w, norm_w, risk_w[:, :31], cat_w, EPS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_compiled_kernel_refuses_cpu_tensors() -> None:
    assert not INTERPRETED
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fused_guard_head(*head_inputs(64, 32, 9, 2, seed=0), EPS)


def test_cpu_rows_take_the_reference_path() -> None:
    inputs = head_inputs(64, 32, 9, 5, seed=3)
    assert not kernels.fused_path_applies(inputs[0])
    assert not kernels.fused_path_applies(inputs[0].double())
    out, ref = guard_head_scores(*inputs, EPS), guard_head_reference(*inputs, EPS)
    assert torch.equal(out.risk_probs, ref.risk_probs)
    assert torch.equal(out.category_ids, ref.category_ids)


def test_reference_matches_the_formula_written_out() -> None:
    """Against the Qwen3Guard head spelled out op by op (Qwen3RMSNorm cast points, fp32 softmax)."""
    hidden, pre_w, norm_w, risk_w, cat_w = (t.bfloat16() for t in head_inputs(64, 32, 9, 5, 4))
    projected = hidden @ pre_w.T
    p32 = projected.float()
    normed = norm_w * (p32 / torch.sqrt(p32.pow(2).mean(-1, keepdim=True) + EPS)).bfloat16()
    ref = guard_head_reference(hidden, pre_w, norm_w, risk_w, cat_w, EPS)
    expected_cat = torch.softmax((normed @ cat_w.T).float(), dim=-1)
    torch.testing.assert_close(ref.category_probs, expected_cat, rtol=0, atol=1e-2)
    torch.testing.assert_close(ref.risk_probs, torch.softmax((normed @ risk_w.T).float(), -1),
                               rtol=0, atol=1e-2)


def test_guard_head_module_exposes_compact_scores() -> None:
    head = GuardHead(config_for("tiny"), num_risk=3, num_category=9)
    hidden = torch.randn(4, head.pre.in_features)
    risk_probs, category_probs = head(hidden)
    scores = head.scores(hidden)
    assert torch.equal(risk_probs, scores.risk_probs)
    assert torch.equal(scores.category_ids, category_probs.argmax(dim=1))
    assert torch.equal(scores.category_max, category_probs.max(dim=1).values)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize(("hidden_size", "categories"), [(1024, 8), (2560, 9), (4096, 9)])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_matches_reference_on_cuda(hidden_size: int, categories: int, rows: int,
                                                   dtype: torch.dtype) -> None:
    inputs = [t.to("cuda", dtype) for t in head_inputs(hidden_size, 512, categories, rows, 1)]
    out = fused_guard_head(*inputs, EPS)
    same_dtype = guard_head_reference(*inputs, EPS)
    exact = guard_head_reference(*[t.double() for t in inputs], EPS)
    assert_close_to_exact(out, same_dtype, exact, dtype)
    assert_winners_agree(out, exact, TOP2_TIE[dtype])


@cuda
def test_guard_heads_on_cuda_use_the_kernel_unless_turned_off() -> None:
    model = GuardModel(config_for("tiny")).to("cuda")
    hidden = torch.randn(6, model.config.hidden_size, device="cuda")
    assert kernels.fused_path_applies(hidden) and model.response.fused
    fused = model.response.scores(hidden)
    model.use_fused_heads(False)
    assert not (model.response.fused or model.query.fused)
    plain = model.response.scores(hidden)
    torch.testing.assert_close(fused.risk_probs, plain.risk_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.category_probs, plain.category_probs, rtol=1e-4, atol=1e-5)
