"""The Triton paged-attention kernel against the plain formula (paged_attention_reference).

On CPU the kernel runs under Triton's interpreter (one subprocess for every case); on CUDA the
compiled kernel runs the same cases. The oracle is the formula in float64 over the same
dtype-rounded inputs; fp32 must agree to rounding, bf16 to the rounding of the probabilities the
kernel casts to bf16 before the product (as flash-attn does).

Cases cover pages of 16 and 32, head_dim 64 and 128, GQA groups 1-4, contexts 1-4096, 1-16 new
queries per session, several sessions per launch with unused (q_len 0) slots and padding rows,
scattered (non-contiguous, unordered) blocks, and one and several key splits (each session's
context cut into equal tile-aligned parts, some of them empty for short contexts).
"""

from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton")

from qguard_stream.kernels.reference import paged_attention_reference

from interpreter import run_interpreted

# (page, head_dim, kv_heads, group, [(context, new queries), ...], splits or None, dtype)
CASES = [
    (16, 64, 2, 1, [(1, 1)], 1, torch.float32),
    (16, 64, 2, 2, [(37, 5), (16, 16), (3, 1)], 1, torch.float32),
    (32, 128, 1, 4, [(100, 16), (64, 7)], 1, torch.bfloat16),
    (16, 128, 2, 3, [(4096, 1)], 8, torch.float32),
    (32, 64, 2, 4, [(4096, 16), (1, 1), (700, 3)], 4, torch.bfloat16),
    (16, 128, 2, 2, [(257, 2), (0, 0), (129, 9)], 3, torch.float32),
    (16, 64, 2, 2, [(300, 1), (20, 4)], None, torch.bfloat16),  # the launcher picks the splits
]
PAD_ROWS = 3  # trailing rows that belong to no session: must stay unwritten
POISON = 1234.5

WORKER = """
import sys, torch
from qguard_stream.kernels import paged_attention as pa
results = []
for inputs, shape in torch.load(sys.argv[1]):
    q, k, v, tables, q_start, q_len, ctx, row_seq = inputs
    heads, kv_heads, dim, page, splits = shape
    out = torch.full_like(q, 1234.5)
    launcher = pa.PagedAttention(heads, kv_heads, dim, page, q.shape[0], torch.device("cpu"),
                                 num_splits=splits)
    launcher(q, k, v, tables, q_start, q_len, ctx, row_seq, out,
             max_queries=max(1, int(q_len.max())))
    results.append(out)
torch.save({"interpreted": pa.INTERPRETED, "outputs": results}, sys.argv[2])
"""


def case_inputs(case: tuple, seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
    """Random q and a pool whose blocks are handed out shuffled, so tables are scattered."""
    page, dim, kv_heads, group, sessions, splits, dtype = case
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    heads = kv_heads * group
    blocks_per = [-(-ctx // page) for ctx, _ in sessions]
    num_blocks = sum(blocks_per) + 2
    free = list(range(num_blocks))
    rng.shuffle(free)
    max_blocks = max(max(blocks_per), 1)
    tables = torch.zeros(len(sessions), max_blocks, dtype=torch.int32)
    for s, count in enumerate(blocks_per):
        tables[s, :count] = torch.tensor([free.pop() for _ in range(count)], dtype=torch.int32)
    rows = sum(n for _, n in sessions) + PAD_ROWS
    q = (torch.randn(rows, heads, dim, generator=gen) / dim**0.25).to(dtype)
    # The pool's layout (kvcache/paged.py): head-major blocks [blocks, KV, page, D], read
    # through [blocks, page, KV, D] views.
    k = (torch.randn(num_blocks, kv_heads, page, dim, generator=gen) / dim**0.25).to(dtype)
    v = torch.randn(num_blocks, kv_heads, page, dim, generator=gen).to(dtype)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    q_len = torch.tensor([n for _, n in sessions], dtype=torch.int32)
    q_start = torch.tensor([0, *torch.tensor([n for _, n in sessions]).cumsum(0)[:-1].tolist()],
                           dtype=torch.int32)
    ctx = torch.tensor([c for c, _ in sessions], dtype=torch.int32)
    row_seq = torch.full((rows,), -1, dtype=torch.int32)
    for s, (_, n) in enumerate(sessions):
        row_seq[int(q_start[s]):int(q_start[s]) + n] = s
    return (q, k, v, tables, q_start, q_len, ctx, row_seq), (heads, kv_heads, dim, page, splits)


def check(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    q, k, v, tables, q_start, q_len, ctx, row_seq = inputs
    exact = paged_attention_reference(q.double(), k.double(), v.double(), tables, q_start, q_len,
                                      ctx)
    scored = row_seq >= 0
    assert torch.all(out[~scored] == POISON), "padding rows were written"
    assert torch.isfinite(out[scored]).all()
    error = (out[scored].double() - exact[scored]).norm() / exact[scored].norm()
    tolerance = 1e-5 if q.dtype == torch.float32 else 1e-2
    assert error < tolerance, f"relative L2 error {error:.2e} > {tolerance:.0e}"
    if q.dtype != torch.float32:  # and as close as the same-dtype formula gets
        same = paged_attention_reference(q, k, v, tables, q_start, q_len, ctx)
        same_error = (same[scored].double() - exact[scored]).norm() / exact[scored].norm()
        assert error < 3 * same_error + 1e-3


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cases = [case_inputs(case, seed) for seed, case in enumerate(CASES)]
    return run_interpreted(WORKER, cases, tmp_path_factory.mktemp("paged"))


def test_the_interpreter_ran_the_kernel(interpreted: dict) -> None:
    assert interpreted["interpreted"]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_interpreted_kernel_matches_the_formula(interpreted: dict, index: int) -> None:
    inputs, _ = case_inputs(CASES[index], index)
    check(interpreted["outputs"][index], inputs)


def test_reference_matches_dense_causal_attention() -> None:
    """The oracle itself, on one contiguous session: plain softmax attention with a causal mask
    (SDPA with GQA), so a wrong gather in the reference cannot hide a wrong kernel."""
    inputs, (_, kv_heads, dim, page, _) = case_inputs(
        (16, 64, 2, 2, [(40, 6)], 1, torch.float64), seed=7)
    q, k, v, tables, q_start, q_len, ctx, _ = inputs
    slots = (tables[0].long()[torch.arange(40) // page] * page + torch.arange(40) % page)
    keys = k.reshape(-1, kv_heads, dim)[slots].transpose(0, 1)[None]
    values = v.reshape(-1, kv_heads, dim)[slots].transpose(0, 1)[None]
    mask = torch.arange(40)[None, :] <= (34 + torch.arange(6))[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:6].transpose(0, 1)[None], keys, values, attn_mask=mask, scale=1.0, enable_gqa=True)
    got = paged_attention_reference(q, k, v, tables, q_start, q_len, ctx)[:6]
    torch.testing.assert_close(got, expected[0].transpose(0, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("index", range(len(CASES)))
def test_compiled_kernel_matches_the_formula_on_cuda(index: int) -> None:
    from qguard_stream.kernels.paged_attention import PagedAttention

    inputs, (heads, kv_heads, dim, page, splits) = case_inputs(CASES[index], index)
    cuda = tuple(t.cuda() for t in inputs)
    q, k, v, tables, q_start, q_len, ctx, row_seq = cuda
    out = torch.full_like(q, POISON)
    PagedAttention(heads, kv_heads, dim, page, q.shape[0], q.device,
                   num_splits=splits)(q, k, v, tables, q_start, q_len, ctx, row_seq, out,
                                      max_queries=max(1, int(q_len.max())))
    torch.cuda.synchronize()
    check(out.cpu(), inputs)


def test_launcher_split_count() -> None:
    """Enough programs to cover the multiprocessors four times, between the floor and the cap:
    a large batch still cuts each context into MIN_SPLITS parts (one program walking a whole
    context alone measured 20-40% slower on an H200)."""
    from qguard_stream.kernels.paged_attention import MAX_SPLITS, MIN_SPLITS, PagedAttention

    launcher = PagedAttention(8, 1, 64, 16, 256, torch.device("cpu"))  # 8 "multiprocessors"
    assert launcher.processors == 8
    assert [launcher.splits_for(n) for n in (1, 2, 4, 6, 8, 64, 256)] == \
        [MAX_SPLITS, MAX_SPLITS, 8, 5, MIN_SPLITS, MIN_SPLITS, MIN_SPLITS]
    fixed = PagedAttention(8, 1, 64, 16, 256, torch.device("cpu"), num_splits=1)
    assert fixed.splits_for(1) == fixed.splits_for(256) == 1
    with pytest.raises(ValueError, match=r"num_splits must be in \[1, 16\], got 17"):
        PagedAttention(8, 1, 64, 16, 256, torch.device("cpu"), num_splits=17)
