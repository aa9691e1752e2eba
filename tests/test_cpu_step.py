"""The C CPU step (kernels/cpu_step.c via qguard_stream/runtime/cpu_step.py), reading the paged
pool: each C function against its PyTorch formula, the whole step against the runner's torch step
and transformers, sessions batched vs alone, and the fallbacks (no compiler, disabled)."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from qguard_stream.kernels import cpu_step
from qguard_stream.kernels.cpu_step import BuildError, pointer
from qguard_stream.kernels.reference import guard_head_reference

from benchmarks.baselines import load_hf_backbone
from qguard_stream import StreamGuard
from qguard_stream.checkpoints import config_for
from qguard_stream.kvcache.paged import BlockTable
from qguard_stream.models.qwen3 import Rotary
from qguard_stream.runtime.cpu_step import MAX_TOKENS, CpuHead
from qguard_stream.runtime.layer import FastHead, rms_norm
from qguard_stream.runtime.paged import Chunk
from qguard_stream.runtime.weights import rope_tables
from tests.test_fastpath import hidden_through_runner, plain_attention

HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def library():
    library = cpu_step.load()
    assert library is not None, "a C compiler exists, so the library must build"
    return library


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_c_guard_head_matches_the_formula_and_the_torch_head(library, tiny_guard: StreamGuard,
                                                             rows: int,
                                                             dtype: torch.dtype) -> None:
    """qg_guard_head (CpuHead) against guard_head_reference in float64 over the same (fp32 or
    bf16) weights, and against the torch head it replaces after the C step, for both roles:
    fp32 agrees with both to fp32 rounding; bf16 weights are read exactly with fp32 arithmetic
    (activations rounded to bf16 where the library runs the bf16 dot instruction), at least as
    close to the formula as torch's bf16 head. A NaN hidden row gives NaN in its own
    probabilities only."""
    torch.manual_seed(rows)
    exact_arithmetic = dtype == torch.float32 or library.qg_bf16_dot() == 0
    for module in (tiny_guard.model.query, tiny_guard.model.response):
        module = copy.deepcopy(module).to(dtype)
        fast = FastHead(module)
        head = CpuHead(fast, library)
        hidden = (torch.randn(rows, tiny_guard.config.hidden_size) * 3).to(dtype)
        risk, category = head(hidden)
        assert risk.dtype == category.dtype == torch.float32
        exact = guard_head_reference(hidden.double(), module.pre.weight.double(),
                                     module.layernorm.weight.double(),
                                     module.risk.weight.double(),
                                     module.category.weight.double(), module.layernorm.eps)
        assert risk.shape == (rows, module.risk.weight.shape[0])
        assert category.shape == (rows, module.category.weight.shape[0])
        torch_risk, torch_category = fast(hidden)
        error = max((risk.double() - exact.risk_probs).abs().max().item(),
                    (category.double() - exact.category_probs).abs().max().item())
        torch_error = max((torch_risk.double() - exact.risk_probs).abs().max().item(),
                          (torch_category.double() - exact.category_probs).abs().max().item())
        if exact_arithmetic:
            assert error < 2e-6
        assert error <= torch_error + 2e-6
        if dtype == torch.float32:
            torch.testing.assert_close(risk, torch_risk, rtol=0, atol=2e-6)
            torch.testing.assert_close(category, torch_category, rtol=0, atol=2e-6)
        hidden[0, 5] = float("nan")
        risk, category = head(hidden)
        assert risk[0].isnan().all() and category[0].isnan().all()
        assert torch.isfinite(risk[1:]).all() and torch.isfinite(category[1:]).all()


def test_exp_is_within_a_few_ulp_of_float64_exp(library) -> None:
    x = torch.linspace(-87.0, 88.0, 200_001)
    out = torch.empty_like(x)
    library.qg_exp(pointer(x), pointer(out), x.numel())
    expected = x.double().exp()
    relative = ((out.double() - expected) / expected).abs().max().item()
    assert relative < 4e-7  # 3-4 ulp of fp32


def test_exp_clamps_instead_of_overflowing(library) -> None:
    x = torch.tensor([-1e4, -float("inf"), 0.0, 1e4])
    out = torch.empty_like(x)
    library.qg_exp(pointer(x), pointer(out), 4)
    assert out[0] < 1e-37 and out[1] < 1e-37 and out[2] == 1.0
    assert torch.isfinite(out[3])


@pytest.mark.parametrize("rows,dim", [(1, 256), (5, 48), (3, 100), (2, 4096)])
def test_rms_norm_matches_the_formula(library, rows: int, dim: int) -> None:
    x, weight = 3.0 * torch.randn(rows, dim), 1.0 + 0.1 * torch.randn(dim)
    out = torch.empty_like(x)
    library.qg_rms_norm(pointer(x), pointer(weight), pointer(out), rows, dim, 1e-6)
    x64 = x.double()
    expected = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (6, 2, 16), (2, 2, 128)])
@pytest.mark.parametrize("positions", [[0], [37], [37, 38, 39], [5, 900, 6]])
def test_qk_rope_store_matches_norm_rope_and_the_pool_write(library, heads: int, kv_heads: int,
                                                            head_dim: int, positions: list[int],
                                                            dtype: torch.dtype) -> None:
    """q in fp32; K and V into an fp32 pool, or a bf16 one rounded as torch rounds."""
    rows, slots_total, page, eps = len(positions), 64, 4, 1e-6
    # Scattered slots, and a padding row (slot -1) whose q is computed but K/V stored nowhere.
    slots = torch.tensor([50, 3, 17][:rows], dtype=torch.int32)
    if rows == 3:
        slots[1] = -1
    position = torch.tensor(positions, dtype=torch.int32)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim)
    qk_weight = 1.0 + 0.1 * torch.randn(heads + kv_heads, head_dim)
    cos, sin = _rope_tables(head_dim, 1000)
    q = torch.empty(rows, heads, head_dim)
    blocks = torch.zeros(2, slots_total // page, kv_heads, page, head_dim,
                         dtype=dtype)  # the pool's layout
    library.qg_qk_rope_store(pointer(qkv), pointer(qk_weight), pointer(cos), pointer(sin),
                             pointer(position, torch.int32), pointer(slots, torch.int32),
                             pointer(q), pointer(blocks[0], dtype), pointer(blocks[1], dtype),
                             page, rows, heads, kv_heads, head_dim, eps,
                             int(dtype == torch.bfloat16))
    pool = blocks.transpose(2, 3).reshape(2, slots_total, kv_heads, head_dim)  # by slot
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(rows, heads + kv_heads, head_dim)
    normed = rms_norm(qk, qk_weight, torch.tensor(eps))
    at = position.long()
    roped = normed * cos[at, None] + normed.roll(head_dim // 2, -1) * sin[at, None]
    torch.testing.assert_close(q, roped[:, :heads], atol=1e-5, rtol=1e-5)
    values = qkv[:, (heads + kv_heads) * head_dim:].view(rows, kv_heads, head_dim)
    written = slots >= 0
    if dtype == torch.bfloat16:  # C's fp32 keys within 1e-5 of torch's, then both rounded
        stored = pool[0, slots[written].long()].float()
        torch.testing.assert_close(stored, roped[written, heads:], atol=1e-5, rtol=8e-3)
    else:
        torch.testing.assert_close(pool[0, slots[written].long()], roped[written, heads:],
                                   atol=1e-5, rtol=1e-5)
    assert torch.equal(pool[1, slots[written].long()], values[written].to(dtype))
    untouched = torch.ones(slots_total, dtype=torch.bool)
    untouched[slots[written].long()] = False
    assert not pool[:, untouched].any()  # nothing written outside the rows' slots


def paged_copy(contexts: list[torch.Tensor], page: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter each session's [2, kv_heads, length, head_dim] K/V into a pool of shuffled blocks
    in the pool's layout: (pool [2, blocks, kv_heads, page, head_dim] with NaN in every unused
    slot, block tables)."""
    blocks = [-(-c.shape[2] // page) for c in contexts]
    order = torch.randperm(sum(blocks) + 3, generator=generator)  # 3 blocks nobody owns
    kv_heads, dim = contexts[0].shape[1], contexts[0].shape[3]
    pool = torch.full((2, sum(blocks) + 3, kv_heads, page, dim), float("nan"))
    tables = torch.zeros(len(contexts), max(blocks), dtype=torch.int32)
    taken = 0
    for s, context in enumerate(contexts):
        own = order[taken:taken + blocks[s]]
        taken += blocks[s]
        tables[s, :blocks[s]] = own.int()
        positions = torch.arange(context.shape[2])
        pool[:, own[positions // page], :, positions % page] = context.permute(2, 0, 1, 3)
    return pool, tables


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("head_dim", [16, 64, 72, 128])
@pytest.mark.parametrize("page", [16, 32, 64])
def test_paged_attention_matches_the_plain_formula(library, group: int, head_dim: int,
                                                   page: int, dtype: torch.dtype) -> None:
    """Several sessions in one call: one token, a chunk, a long context, a skipped session
    (q_len 0), a chunk of 16; unused pool slots hold NaN, so any stray read shows. A bf16 pool
    is read as the fp32 values it holds."""
    kv_heads = 2
    shapes = [(9, 1), (9, 4), (1024, 1), (5, 0), (30, 16), (0, 6)]  # (start, new)
    generator = torch.Generator().manual_seed(group * 1000 + head_dim + page)
    contexts = [torch.randn(2, kv_heads, start + new, head_dim, generator=generator)
                .to(dtype).float() for start, new in shapes]
    pool, tables = paged_copy(contexts, page, generator)
    pool = pool.to(dtype)
    queries = [torch.randn(new, kv_heads * group, head_dim, generator=generator) / head_dim**0.5
               for _, new in shapes]
    q = torch.cat(queries)
    q_len = torch.tensor([new for _, new in shapes], dtype=torch.int32)
    q_start = (torch.cumsum(q_len, 0) - q_len).int()
    ctx_len = torch.tensor([start + new for start, new in shapes], dtype=torch.int32)
    out = torch.full((q.shape[0], kv_heads * group * head_dim), float("nan"))
    status = library.qg_attend_paged(
        pointer(q), pointer(pool[0], dtype), pointer(pool[1], dtype),
        pointer(tables, torch.int32), tables.shape[1], page, pointer(q_start, torch.int32),
        pointer(q_len, torch.int32), pointer(ctx_len, torch.int32), len(shapes),
        kv_heads * group, kv_heads, head_dim, pointer(out), int(dtype == torch.bfloat16))
    assert status == 0
    for s, (start, new) in enumerate(shapes):
        if new == 0:
            continue
        context = contexts[s].double()
        expected = plain_attention(queries[s].double(), context[0], context[1], start)
        rows = slice(int(q_start[s]), int(q_start[s]) + new)
        torch.testing.assert_close(out[rows].double(), expected, atol=2e-6, rtol=2e-6)


def test_silu_mul_matches_swiglu(library) -> None:
    gate_up = torch.cat((torch.linspace(-100.0, 100.0, 3 * 768).view(3, 768),
                         torch.randn(3, 768)), dim=1)
    out = torch.empty(3, 768)
    library.qg_silu_mul(pointer(gate_up), pointer(out), 3, 768)
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(out.double(), F.silu(gate) * up, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,cols,out", [(1, 256, 512), (3, 100, 37), (4, 64, 2050),
                                           (9, 768, 256), (16, 1536, 513)])
def test_gemm_matches_the_formula_with_and_without_residual(library, threads: int, rows: int,
                                                            cols: int, out: int) -> None:
    """qg_gemm: y = x W^T (+ residual), W [out, cols] as nn.Linear keeps it; odd widths, a
    column count that is no multiple of 8, rows past a multiple of 4, on 1 and 2 threads (the
    pool's chunks); every output written (the output starts as NaN)."""
    library.qg_set_threads(threads)
    try:
        gen = torch.Generator().manual_seed(rows * cols + out)
        x = torch.randn(rows, cols, generator=gen)
        weight = torch.randn(out, cols, generator=gen)
        residual = torch.randn(rows, out, generator=gen)
        for with_residual in (False, True):
            y = torch.full((rows, out), float("nan"))
            library.qg_gemm(pointer(x), pointer(weight),
                            pointer(residual) if with_residual else None, pointer(y), rows, cols,
                            out)
            expected = x.double() @ weight.double().t()
            if with_residual:
                expected += residual.double()
            torch.testing.assert_close(y.double(), expected, atol=1e-5 * cols ** 0.5, rtol=1e-5)
    finally:
        library.qg_set_threads(torch.get_num_threads())


@pytest.mark.parametrize("rows,cols,out", [(1, 256, 512), (3, 100, 37), (16, 1536, 513)])
def test_bf16_weight_gemm_equals_the_fp32_gemm_on_the_same_values(library, rows: int, cols: int,
                                                                  out: int) -> None:
    """qg_gemm_bf16 widens each bf16 weight to the fp32 it stands for and does the same
    arithmetic: it equals qg_gemm on the widened weights exactly, and the formula."""
    if library.qg_bf16_dot():
        pytest.skip("this CPU's build runs bf16 projections on its bf16 dot instruction "
                    "(test_bf16_dot_projections_match_the_formula_on_bf16_activations)")
    gen = torch.Generator().manual_seed(rows + cols + out)
    x, residual = torch.randn(rows, cols, generator=gen), torch.randn(rows, out, generator=gen)
    weight = torch.randn(out, cols, generator=gen).bfloat16()
    widened = weight.float()
    got, expected = torch.full((rows, out), float("nan")), torch.empty(rows, out)
    library.qg_gemm_bf16(pointer(x), pointer(weight, torch.bfloat16), pointer(residual),
                         pointer(got), rows, cols, out)
    library.qg_gemm(pointer(x), pointer(widened), pointer(residual), pointer(expected), rows,
                    cols, out)
    assert torch.equal(got, expected)
    formula = x.double() @ widened.double().t() + residual.double()
    torch.testing.assert_close(got.double(), formula, atol=1e-5 * cols ** 0.5, rtol=1e-5)


CPU_HAS_BF16_DOT = "avx512_bf16" in cpu_step._cpu_flags().split()
EMULATED = ("-DQG_BF16_DOT_EMULATED",)


@pytest.fixture(scope="module", params=["emulated", "native"])
def dot_library(request: pytest.FixtureRequest):
    """The library with bf16 projections on VDPBF16PS: this CPU's own build where it has the
    instruction, and everywhere a build with the instruction emulated in C (lane by lane, as
    Intel specifies it), so machines without it test everything but the instruction."""
    if request.param == "native":
        if not CPU_HAS_BF16_DOT:
            pytest.skip("this CPU has no AVX512-BF16")
        library = cpu_step.load()
        assert library is not None and library.qg_bf16_dot() == 1
        return library
    library = cpu_step.load(EMULATED)
    assert library is not None and library.qg_bf16_dot() == 2
    return library


def test_the_c_guard_head_on_the_bf16_dot_instruction(dot_library,
                                                      tiny_guard: StreamGuard) -> None:
    """A bf16 head through the bf16 dot instruction: its activations rounded to bf16, then as
    close to the float64 formula as torch's bf16 head (within bf16 rounding of the inputs)."""
    torch.manual_seed(5)
    module = copy.deepcopy(tiny_guard.model.response).to(torch.bfloat16)
    fast = FastHead(module)
    hidden = (torch.randn(7, tiny_guard.config.hidden_size) * 3).to(torch.bfloat16)
    risk, category = CpuHead(fast, dot_library)(hidden)
    exact = guard_head_reference(hidden.double(), module.pre.weight.double(),
                                 module.layernorm.weight.double(), module.risk.weight.double(),
                                 module.category.weight.double(), module.layernorm.eps)
    torch_risk, _ = fast(hidden)
    error = (risk.double() - exact.risk_probs).abs().max().item()
    assert 0 < error < 2 * (torch_risk.double() - exact.risk_probs).abs().max().item() + 1e-3
    assert torch.allclose(category.sum(1), torch.ones(7))


def test_the_default_build_uses_the_bf16_dot_instruction_exactly_where_the_cpu_has_it(
        library) -> None:
    assert library.qg_bf16_dot() == (1 if CPU_HAS_BF16_DOT else 0)


def test_the_bf16_dot_instruction_path_compiles_for_cpus_that_have_it(tmp_path: Path) -> None:
    """The native branch (intrinsics) cannot run here without the instruction; it must at least
    compile, for a Sapphire Rapids target, and emit VDPBF16PS."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    target = tmp_path / "spr.so"
    result = subprocess.run([compiler, *cpu_step.BASE_FLAGS, "-march=sapphirerapids",
                             str(cpu_step.SOURCE), "-o", str(target), "-lm"],
                            capture_output=True, text=True, timeout=120)
    if "sapphirerapids" in result.stderr and result.returncode != 0:
        pytest.skip(f"{compiler} does not know -march=sapphirerapids")
    assert result.returncode == 0, result.stderr
    if shutil.which("objdump"):
        listing = subprocess.run(["objdump", "-d", str(target)], capture_output=True,
                                 text=True, timeout=120).stdout
        assert "vdpbf16ps" in listing


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,cols,out", [(1, 256, 512), (3, 100, 37), (4, 64, 2050),
                                           (5, 33, 7), (16, 1536, 513), (9, 31, 66)])
def test_bf16_dot_projections_match_the_formula_on_bf16_activations(
        dot_library, threads: int, rows: int, cols: int, out: int) -> None:
    """With the bf16 dot instruction, qg_gemm_bf16 rounds the activations to bf16 (nearest
    even) and sums exact bf16 products in fp32: the formula on bf16-rounded x, to fp32
    accumulation error (far tighter than the rounding of x itself, so a path that kept x in
    fp32 fails it), in the 4-row blocks, the leftover rows and the tails past 32 columns."""
    gen = torch.Generator().manual_seed(rows * cols + out)
    x, residual = torch.randn(rows, cols, generator=gen), torch.randn(rows, out, generator=gen)
    weight = torch.randn(out, cols, generator=gen).bfloat16()
    got = torch.full((rows, out), float("nan"))
    dot_library.qg_set_threads(threads)
    try:
        dot_library.qg_gemm_bf16(pointer(x), pointer(weight, torch.bfloat16), pointer(residual),
                                 pointer(got), rows, cols, out)
    finally:
        dot_library.qg_set_threads(torch.get_num_threads())
    formula = x.bfloat16().double() @ weight.double().t() + residual.double()
    torch.testing.assert_close(got.double(), formula, atol=2e-6 * cols ** 0.5, rtol=1e-6)
    unrounded = x.double() @ weight.double().t() + residual.double()
    assert (got.double() - unrounded).abs().max() > 20 * (got.double() - formula).abs().max()


@pytest.mark.parametrize("chunk", [1, 3, MAX_TOKENS])
def test_a_bf16_guard_on_the_bf16_dot_instruction_follows_the_fp32_model(
        dot_library, tiny_checkpoint: Path, chunk: int) -> None:
    """A bf16 guard's C step with its projections on the bf16 dot instruction (one-token GEMVs
    at chunk 1, GEMMs past it) over a stream: as close to the fp32 model as the torch bf16 step
    (which rounds every activation to bf16), and close to the widened C step."""
    guard = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.bfloat16)
    ids = torch.randint(0, 151936, (64,), generator=torch.Generator().manual_seed(chunk))
    bounds = (0, 20, *range(20 + chunk, 64, chunk), 64)
    got = hidden_through_runner(guard, ids, bounds, c_library=dot_library).float()
    widened = hidden_through_runner(guard, ids, bounds, use_c_step=True).float()
    torch_bf16 = hidden_through_runner(guard, ids, bounds, use_c_step=False).float()
    exact = hidden_through_runner(StreamGuard.from_pretrained(tiny_checkpoint, device="cpu"),
                                  ids, bounds, use_c_step=False)
    assert torch.isfinite(got).all()
    assert not torch.equal(got, widened)  # the activations were rounded: another path ran
    assert (got - exact).abs().max() <= 1.5 * (torch_bf16 - exact).abs().max()
    torch.testing.assert_close(got, widened, atol=0.1, rtol=0.05)


def test_the_thread_pool_serves_concurrent_callers_and_forked_children(library) -> None:
    """Jobs from four Python threads at once (one uses the pool, the others run alone) all come
    out right; a forked child (no helper threads there) still computes, without hanging."""
    import os
    import threading

    library.qg_set_threads(2)
    gen = torch.Generator().manual_seed(5)
    x, weight = torch.randn(8, 512, generator=gen), torch.randn(1024, 512, generator=gen)
    expected = (x.double() @ weight.double().t()).float()
    failures: list[str] = []

    def work() -> None:
        for _ in range(50):
            y = torch.full((8, 1024), float("nan"))
            library.qg_gemm(pointer(x), pointer(weight), None, pointer(y), 8, 512, 1024)
            if not torch.allclose(y, expected, atol=1e-3, rtol=1e-4):
                failures.append("wrong result")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures and not any(thread.is_alive() for thread in threads)
    child = os.fork()
    if child == 0:  # the child: compute once, exit 0 if right
        y = torch.empty(8, 1024)
        library.qg_gemm(pointer(x), pointer(weight), None, pointer(y), 8, 512, 1024)
        os._exit(0 if torch.allclose(y, expected, atol=1e-3, rtol=1e-4) else 1)
    for _ in range(600):  # bounded wait: 60 s
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        threading.Event().wait(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the forked child hung in qg_gemm")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_the_pool_stays_right_on_a_cpu_shared_with_busy_processes(library) -> None:
    """With three busy processes on this box's cores and the helper woken whatever the load
    (adapting off), helpers get descheduled mid-job (the caller then finishes the unclaimed
    chunks and waits only for claimed ones): every result stays exact."""
    from benchmarks.latency import competing_processes

    library.qg_set_threads(2)
    library.qg_set_adaptive(0)
    gen = torch.Generator().manual_seed(6)
    x, weight = torch.randn(4, 512, generator=gen), torch.randn(2048, 512, generator=gen)
    expected = (x.double() @ weight.double().t()).float()
    try:
        with competing_processes(3):
            for _ in range(300):
                y = torch.full((4, 2048), float("nan"))
                library.qg_gemm(pointer(x), pointer(weight), None, pointer(y), 4, 512, 2048)
                torch.testing.assert_close(y, expected, atol=1e-3, rtol=1e-4)
        assert pool_state(library)[0] == 1  # the helper was offered every job
    finally:
        library.qg_set_adaptive(1)
        library.qg_set_threads(torch.get_num_threads())


def pool_state(library) -> tuple[int, int, int]:
    """(helpers the last pool job used, runnable tasks not ours at the last look, CPUs)."""
    import ctypes

    state = (ctypes.c_int64 * 3)()
    library.qg_pool_state(state)
    return tuple(state)


@pytest.mark.parametrize("wanted,cpus,others,expected", [
    (1, 2, 0, 1), (1, 2, 1, 0), (1, 2, 5, 0), (1, 1, 0, 0), (15, 16, 0, 15), (15, 16, 4, 11),
    (3, 16, 4, 3), (7, 8, 7, 0), (7, 8, -1, 7), (0, 8, 0, 0)])
def test_usable_helpers_keep_one_cpu_per_thread_the_callers_first(
        library, wanted: int, cpus: int, others: int, expected: int) -> None:
    """Helpers fill the CPUs that other runnable tasks and the caller leave, at most `wanted`."""
    assert library.qg_usable_helpers(wanted, cpus, others) == expected


def test_the_pool_wakes_no_helper_while_busy_processes_take_every_cpu(library) -> None:
    """With as many busy processes as CPUs, the pool's look at the machine (every 2 ms) finds
    them and its jobs run on the caller alone, exactly; with adapting off it offers the helper
    again. Whatever the load, a job never uses fewer helpers than the last look left room
    for."""
    import time

    from benchmarks.latency import competing_processes

    gen = torch.Generator().manual_seed(7)
    x, weight = torch.randn(4, 512, generator=gen), torch.randn(2048, 512, generator=gen)
    expected = (x.double() @ weight.double().t()).float()

    def job() -> tuple[int, int, int]:
        y = torch.full((4, 2048), float("nan"))
        library.qg_gemm(pointer(x), pointer(weight), None, pointer(y), 4, 512, 2048)
        torch.testing.assert_close(y, expected, atol=1e-3, rtol=1e-4)
        helpers, others, cpus = pool_state(library)
        assert library.qg_usable_helpers(1, cpus, others) <= helpers <= 1
        return helpers, others, cpus

    library.qg_set_threads(2)
    try:
        for _ in range(20):  # quiet or not, the invariant holds
            job()
            time.sleep(0.003)
        cpus = job()[2]
        assert cpus >= 1
        with competing_processes(cpus):
            states = []
            for _ in range(20):  # 60 ms: many looks, each seeing every busy process runnable
                states.append(job())
                time.sleep(0.003)
            # others: the busy processes, less any CPU share of ours the look could not place
            assert states[-1][0] == 0 and states[-1][1] >= cpus - 1, states
            library.qg_set_adaptive(0)
            assert job()[0] == 1
    finally:
        library.qg_set_adaptive(1)
        library.qg_set_threads(torch.get_num_threads())


def test_torch_runs_on_the_threads_asked_in_a_block_and_gets_its_count_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a block torch runs on one thread in every thread that entered one (nested and
    concurrent blocks too), each block yields the count from before the first, and the count
    is back once all have left; with a torch whose pool cannot be resized (not OpenMP) nothing
    is changed."""
    import threading

    from qguard_stream.runtime import cpu_step as step_module

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inside: list[int] = []
        barrier = threading.Barrier(3)

        def hold() -> None:
            with step_module.torch_threads(1) as threads:
                barrier.wait(timeout=10)
                inside.append(threads)
                barrier.wait(timeout=10)

        workers = [threading.Thread(target=hold) for _ in range(2)]
        for worker in workers:
            worker.start()
        with step_module.torch_threads(1) as threads:
            barrier.wait(timeout=10)
            assert torch.get_num_threads() == 1 and threads == 2
            with step_module.torch_threads(1) as nested:
                assert nested == 2 and torch.get_num_threads() == 1
            barrier.wait(timeout=10)
        for worker in workers:
            worker.join(timeout=10)
        assert inside == [2, 2] and torch.get_num_threads() == 2
        with step_module.torch_threads(3) as threads:  # any count, not only one
            assert threads == 2 and torch.get_num_threads() == 3
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(step_module, "_openmp_backend", lambda: False)
        with step_module.torch_threads(1) as threads:
            assert threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin to one")
def test_a_process_pinned_to_some_cpus_does_not_adapt() -> None:
    """The runnable count is the machine's: pinned to one of the CPUs, a process cannot tell
    whether the others' tasks compete with it, so its pool never looks and offers the helper."""
    from fresh import last_line

    script = (
        "import os, ctypes, torch\n"
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from qguard_stream.kernels.cpu_step import load, pointer\n"
        "library = load()\n"
        "library.qg_set_threads(2)\n"
        "x, w, y = torch.randn(4, 512), torch.randn(2048, 512), torch.empty(4, 2048)\n"
        "library.qg_gemm(pointer(x), pointer(w), None, pointer(y), 4, 512, 2048)\n"
        "state = (ctypes.c_int64 * 3)()\n"
        "library.qg_pool_state(state)\n"
        "print(list(state)[:2], library.qg_threads_with_room(2))\n")
    assert last_line(script) == "[1, -1] 2"


def test_the_eager_cpu_step_runs_torch_on_the_threads_the_machine_has_room_for(
        tiny_guard: StreamGuard, library, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk past 16 tokens takes torch's step: with as many busy processes as CPUs it runs
    on one thread (an OpenMP barrier waiting for a descheduled worker made such steps 20-40x
    slower), with adapting off on torch's count; the verdicts equal the quiet ones, and
    torch's count is back after each step."""
    import time

    from benchmarks.latency import competing_processes

    runner = tiny_guard.paged_runtime()[1]
    assert runner.room is library
    seen: list[int] = []
    eager = runner._eager
    monkeypatch.setattr(runner, "_eager", lambda chunks, rows, longest: seen.append(
        torch.get_num_threads()) or eager(chunks, rows, longest))
    ids = list(range(1, 41))

    def verdicts() -> torch.Tensor:
        state = tiny_guard.open_stream()
        try:
            return tiny_guard.moderate(state, ids, "assistant").risk_probs
        finally:
            tiny_guard.close_stream(state)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        quiet = verdicts()
        cpus = len(os.sched_getaffinity(0))
        with competing_processes(cpus):
            for _ in range(3):  # the pool looks at the machine every 2 ms, keeping two looks
                library.qg_threads_with_room(2)
                time.sleep(0.003)
            seen.clear()
            loaded = verdicts()
            assert seen == [1] and torch.get_num_threads() == 2
            library.qg_set_adaptive(0)
            seen.clear()
            verdicts()
            assert seen == [2] and torch.get_num_threads() == 2
        torch.testing.assert_close(loaded, quiet, atol=1e-5, rtol=1e-5)
    finally:
        library.qg_set_adaptive(1)
        torch.set_num_threads(before)


def test_the_runner_takes_the_c_step_for_up_to_16_tokens_per_session(
        tiny_guard: StreamGuard, library, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = tiny_guard.paged_runtime()[1]
    assert runner.cpu_step is not None and runner.cpu_step.library is library
    eager_steps = []
    eager = runner._eager
    monkeypatch.setattr(runner, "_eager", lambda chunks, rows, longest: eager_steps.append(rows)
                        or eager(chunks, rows, longest))
    state = tiny_guard.open_stream()
    for count in (40, 1, MAX_TOKENS, MAX_TOKENS + 1, 3):
        tiny_guard.moderate(state, list(range(1, count + 1)), "assistant")
    tiny_guard.close_stream(state)
    assert eager_steps == [40, MAX_TOKENS + 1]


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, MAX_TOKENS])
def test_c_step_equals_the_torch_step_over_a_stream(tiny_guard: StreamGuard, chunk: int) -> None:
    ids = torch.randint(0, 151936, (64,), generator=torch.Generator().manual_seed(chunk))
    bounds = (0, 20, *range(20 + chunk, 64, chunk), 64)
    got = hidden_through_runner(tiny_guard, ids, bounds, use_c_step=True)
    expected = hidden_through_runner(tiny_guard, ids, bounds, use_c_step=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, MAX_TOKENS])
def test_bf16_c_step_follows_the_bf16_torch_step_over_a_stream(tiny_checkpoint: Path,
                                                                chunk: int) -> None:
    """A bf16 guard on the CPU: the C step (bf16 weights and K/V widened on load, fp32
    arithmetic) against the eager torch step in bf16 (which rounds every activation to bf16),
    over a stream whose first 20 tokens take the torch step in both."""
    guard = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.bfloat16)
    ids = torch.randint(0, 151936, (64,), generator=torch.Generator().manual_seed(chunk))
    bounds = (0, 20, *range(20 + chunk, 64, chunk), 64)
    got = hidden_through_runner(guard, ids, bounds, use_c_step=True).float()
    expected = hidden_through_runner(guard, ids, bounds, use_c_step=False).float()
    exact = hidden_through_runner(StreamGuard.from_pretrained(tiny_checkpoint, device="cpu"),
                                  ids, bounds, use_c_step=False)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # the C step is as close to the fp32 model as the torch bf16 step, or closer
    c_error = (got - exact).abs().max()
    torch_error = (expected - exact).abs().max()
    assert c_error <= 1.5 * torch_error, (c_error, torch_error)
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)


def test_a_bf16_guard_on_the_cpu_scores_with_the_c_step_like_its_fp32_twin(
        tiny_checkpoint: Path) -> None:
    """StreamGuard(dtype=bf16) on the CPU takes the C step for stream chunks; over a 300-token
    stream its verdicts agree with the fp32 guard's (the risk argmax at most positions, every
    probability within 0.05)."""
    half = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.bfloat16)
    full = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu")
    assert half.paged_runtime()[1].cpu_step.bf16
    ids = torch.randint(0, 151936, (300,), generator=torch.Generator().manual_seed(9))
    probs = []
    for guard in (half, full):
        state = guard.open_stream()
        scored = [guard.moderate(state, ids[:40], "user").risk_probs]
        for at in range(40, 300, 4):
            scored.append(guard.moderate(state, ids[at:at + 4], "assistant").risk_probs)
        probs.append(torch.cat(scored).float())
    assert (probs[0] - probs[1]).abs().max() < 0.05
    agree = (probs[0].argmax(-1) == probs[1].argmax(-1)).float().mean()
    assert agree >= 0.95, agree


def test_c_step_hidden_states_match_transformers_token_by_token(tiny_guard: StreamGuard,
                                                                tiny_checkpoint: Path) -> None:
    hf = load_hf_backbone(tiny_checkpoint, tiny_guard.config, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 151936, (40,), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = hf(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    # page 4: a 40-token stream crosses ten blocks, one C call per layer per token
    hidden = hidden_through_runner(tiny_guard, ids, tuple(range(41)), block_size=4,
                                   use_c_step=True)
    torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=1e-4)


def test_sessions_batched_in_one_c_step_equal_each_alone(tiny_guard: StreamGuard) -> None:
    """Three sessions with different contexts and chunk sizes in one step vs one by one."""
    guard = tiny_guard
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 151936, (n,), generator=generator) for n in (5, 33, 17)]
    news = [torch.randint(0, 151936, (n,), generator=generator) for n in (1, 4, 16)]
    alone = []
    for prompt, new in zip(prompts, news):
        state = guard.open_stream()
        guard.moderate(state, prompt, "user")
        alone.append(guard.moderate(state, new, "assistant").risk_probs)
        guard.close_stream(state)
    pool, runner = guard.paged_runtime()
    tables = [BlockTable(pool.block_size) for _ in prompts]
    try:
        for table, prompt in zip(tables, prompts):
            table.grow(pool, prompt.shape[0])
            runner.forward([Chunk(table, 0, prompt, "user")])
        for table, prompt, new in zip(tables, prompts, news):
            table.grow(pool, prompt.shape[0] + new.shape[0])
        together = runner.forward([Chunk(t, p.shape[0], n, "assistant")
                                   for t, p, n in zip(tables, prompts, news)])
    finally:
        for table in tables:
            table.shrink(pool, 0)
    for (risk, _), expected in zip(together, alone):
        torch.testing.assert_close(risk, expected, atol=1e-5, rtol=1e-5)


def test_disabled_by_environment_runs_the_eager_step(tiny_checkpoint: Path,
                                                     tiny_guard: StreamGuard,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_step.DISABLE_ENV, "0")
    cpu_step.load.cache_clear()
    try:
        eager = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu")
    finally:
        cpu_step.load.cache_clear()
    assert eager.paged_runtime()[1].cpu_step is None
    ids = list(range(100, 140))
    expected = _score(eager, ids)
    torch.testing.assert_close(_score(tiny_guard, ids), expected, atol=1e-5, rtol=0)


def test_a_failing_compiler_is_reported_and_falls_back(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "false")
    with pytest.raises(BuildError, match="false"):
        cpu_step.build(tmp_path)
    assert not list(tmp_path.iterdir())  # no half-written library left behind
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_step.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert cpu_step.load() is None
    finally:
        cpu_step.load.cache_clear()
    assert "eager PyTorch step" in caplog.text


def test_pointer_refuses_tensors_the_c_code_cannot_read() -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        pointer(torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous=False"):
        pointer(torch.zeros(4, 4).t())


def _rope_tables(head_dim: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    config = replace(config_for("tiny"), head_dim=head_dim, max_position_embeddings=positions)
    return rope_tables(config, Rotary(head_dim, config.rope_theta).inv_freq, torch.float32)


def _score(guard: StreamGuard, ids: list[int]) -> torch.Tensor:
    state = guard.open_stream()
    guard.moderate(state, ids[:20], "user")
    risks = [guard.moderate(state, token, "assistant").risk_probs for token in ids[20:]]
    guard.close_stream(state)
    return torch.cat(risks)
