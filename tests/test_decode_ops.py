"""The decode step's small Triton kernels (kernels/decode_ops.py) against the plain formulas of
kernels/reference.py, under the interpreter on CPU and compiled on CUDA: fp32 to rounding, bf16
to the same cast points as the torch path (within one bf16 rounding of it)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from qguard_stream.kernels.reference import (
    qk_norm_rope_reference,
    rms_norm,
    silu_mul_reference,
)

from interpreter import run_interpreted

EPS = 1e-6
HEADS, KV_HEADS, DIM, ROWS, SLOTS, PAGE = 4, 2, 64, 5, 12, 4
POISON = 77.0
DTYPES = (torch.float32, torch.bfloat16)

WORKER = """
import sys, torch
from qguard_stream.kernels import decode_ops as ops
results = []
for case in torch.load(sys.argv[1]):
    x, w, qkv, qk_norm, cos, sin, positions, slots, gate_up, heads, kv, slot_count = case
    q = torch.full((qkv.shape[0], heads, qk_norm.shape[1]), 77.0, dtype=qkv.dtype)
    # the pool's layout: head-major blocks [blocks, KV, page, D], passed as [blocks, page, KV, D]
    k = torch.full((slot_count // 4, kv, 4, qk_norm.shape[1]), 77.0, dtype=qkv.dtype)
    v = torch.full_like(k, 77.0)
    ops.qk_norm_rope_store(qkv, qk_norm, cos, sin, positions, slots, q, k.transpose(1, 2),
                           v.transpose(1, 2), 1e-6)
    results.append({"rms": ops.rms_norm(x, w, 1e-6), "q": q,
                    "k": k.transpose(1, 2).reshape(slot_count, kv, -1),
                    "v": v.transpose(1, 2).reshape(slot_count, kv, -1),
                    "silu": ops.silu_mul(gate_up)})
torch.save({"interpreted": ops.INTERPRETED, "outputs": results}, sys.argv[2])
"""


def case(dtype: torch.dtype, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(ROWS, 200, generator=gen) * 3).to(dtype)  # 200: no power of two
    w = (1 + 0.2 * torch.randn(200, generator=gen)).to(dtype)
    qkv = torch.randn(ROWS, (HEADS + 2 * KV_HEADS) * DIM, generator=gen).to(dtype)
    qk_norm = (1 + 0.2 * torch.randn(HEADS + KV_HEADS, DIM, generator=gen)).to(dtype)
    angles = torch.rand(64, DIM // 2, generator=gen) * 6.3
    angles = torch.cat((angles, angles), -1)
    sin = angles.sin()
    sin[:, :DIM // 2] *= -1
    cos, sin = angles.cos().to(dtype), sin.to(dtype)
    positions = torch.tensor([0, 5, 63, 17, 17])
    slots = torch.tensor([3, 0, 11, -1, 7])  # row 3 is padding: writes nowhere
    gate_up = (torch.randn(ROWS, 2 * 1500, generator=gen) * 2).to(dtype)  # 1500: a partial tile
    return x, w, qkv, qk_norm, cos, sin, positions, slots, gate_up, HEADS, KV_HEADS, SLOTS


def check(out: dict, inputs: tuple) -> None:
    x, w, qkv, qk_norm, cos, sin, positions, slots, gate_up, heads, kv, _ = inputs
    exact = x.dtype == torch.float32
    close = {"rtol": 1e-5, "atol": 1e-5} if exact else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(out["rms"], rms_norm(x, w, EPS), **close)
    q, k, v = qk_norm_rope_reference(qkv, qk_norm, cos, sin, positions, heads, kv, EPS)
    torch.testing.assert_close(out["q"], q, **close)
    written = slots >= 0
    torch.testing.assert_close(out["k"][slots[written]], k[written], **close)
    assert torch.equal(out["v"][slots[written]], v[written])
    untouched = torch.ones(SLOTS, dtype=torch.bool)
    untouched[slots[written]] = False
    assert torch.all(out["k"][untouched] == POISON) and torch.all(out["v"][untouched] == POISON)
    torch.testing.assert_close(out["silu"], silu_mul_reference(gate_up), **close)
    if not exact:  # the bf16 cast points: most elements equal the torch path's bits
        assert (out["q"] == q).float().mean() > 0.95
        assert (out["rms"] == rms_norm(x, w, EPS)).float().mean() > 0.95


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cases = [case(dtype, seed) for seed, dtype in enumerate(DTYPES)]
    return run_interpreted(WORKER, cases, tmp_path_factory.mktemp("decode_ops"))


def test_the_interpreter_ran_the_kernels(interpreted: dict) -> None:
    assert interpreted["interpreted"]


@pytest.mark.parametrize("index", range(len(DTYPES)))
def test_interpreted_kernels_match_the_formulas(interpreted: dict, index: int) -> None:
    check(interpreted["outputs"][index], case(DTYPES[index], index))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("index", range(len(DTYPES)))
def test_compiled_kernels_match_the_formulas_on_cuda(index: int) -> None:
    from qguard_stream.kernels import decode_ops as ops

    inputs = case(DTYPES[index], index)
    x, w, qkv, qk_norm, cos, sin, positions, slots, gate_up, heads, kv, slot_count = (
        t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs)
    q = torch.full((qkv.shape[0], heads, DIM), POISON, dtype=qkv.dtype, device="cuda")
    k = torch.full((slot_count // PAGE, kv, PAGE, DIM), POISON, dtype=qkv.dtype, device="cuda")
    v = torch.full_like(k, POISON)
    ops.qk_norm_rope_store(qkv, qk_norm, cos, sin, positions, slots, q, k.transpose(1, 2),
                           v.transpose(1, 2), EPS)
    out = {"rms": ops.rms_norm(x, w, EPS), "q": q,
           "k": k.transpose(1, 2).reshape(slot_count, kv, DIM),
           "v": v.transpose(1, 2).reshape(slot_count, kv, DIM), "silu": ops.silu_mul(gate_up)}
    check({name: t.cpu() for name, t in out.items()}, inputs)
