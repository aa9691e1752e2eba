"""The C CPU decode step (kernels/cpu_step.c via qguard_stream/runtime/cpu_step.py): each C function
against its PyTorch formula, the whole step against the eager fast path and transformers, and the
fallbacks (no compiler, disabled, a step past the buffer)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from qguard_stream.kernels import cpu_step
from qguard_stream.kernels.cpu_step import BuildError, pointer

from benchmarks.baselines import load_hf_backbone
from qguard_stream import StreamGuard
from qguard_stream.checkpoints import config_for
from qguard_stream.models.qwen3 import Rotary
from qguard_stream.runtime.cpu_step import C_ATTENTION_TOKENS, MAX_TOKENS
from qguard_stream.runtime.layer import rms_norm
from qguard_stream.runtime.weights import rope_tables
from tests.test_fastpath import plain_attention

HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def library():
    library = cpu_step.load()
    assert library is not None, "a C compiler exists, so the library must build"
    return library


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


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (6, 2, 16), (2, 2, 128)])
@pytest.mark.parametrize("start,new", [(0, 1), (37, 1), (37, 3)])
def test_qk_rope_store_matches_norm_rope_and_cache_write(library, heads: int, kv_heads: int,
                                                         head_dim: int, start: int,
                                                         new: int) -> None:
    capacity, eps = 64, 1e-6
    qkv = torch.randn(new, (heads + 2 * kv_heads) * head_dim)
    qk_weight = 1.0 + 0.1 * torch.randn(heads + kv_heads, head_dim)
    cos, sin = _rope(head_dim, start, new)
    q = torch.empty(new, heads, head_dim)
    cache = torch.zeros(2, kv_heads, capacity, head_dim)
    library.qg_qk_rope_store(pointer(qkv), pointer(qk_weight), pointer(cos), pointer(sin),
                             pointer(q), pointer(cache[0]), pointer(cache[1]),
                             capacity * head_dim, start, new, heads, kv_heads, head_dim, eps)
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(new, heads + kv_heads, head_dim)
    normed = rms_norm(qk, qk_weight, torch.tensor(eps))
    roped = normed * cos[:, None] + normed.roll(head_dim // 2, -1) * sin[:, None]
    torch.testing.assert_close(q, roped[:, :heads], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[0, :, start:start + new], roped[:, heads:].transpose(0, 1),
                               atol=1e-5, rtol=1e-5)
    values = qkv[:, (heads + kv_heads) * head_dim:].view(new, kv_heads, head_dim)
    assert torch.equal(cache[1, :, start:start + new], values.transpose(0, 1))
    untouched = torch.ones(capacity, dtype=torch.bool)
    untouched[start:start + new] = False
    assert not cache[:, :, untouched].any()  # nothing written outside start..start+new


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("head_dim", [16, 64, 72, 128])
@pytest.mark.parametrize("start,new", [(0, 1), (9, 1), (9, 4), (0, 6), (1024, 1), (30, 16)])
def test_attention_matches_the_plain_formula(library, group: int, head_dim: int, start: int,
                                             new: int) -> None:
    kv_heads, capacity = 2, start + new + 5
    generator = torch.Generator().manual_seed(start * 100 + new + head_dim)
    q = torch.randn(new, kv_heads * group, head_dim, generator=generator) / head_dim**0.5
    cache = torch.randn(2, kv_heads, capacity, head_dim, generator=generator)
    out = torch.empty(new, kv_heads * group * head_dim)
    status = library.qg_attend(pointer(q), pointer(cache[0]), pointer(cache[1]),
                               capacity * head_dim, start, new, kv_heads * group, kv_heads,
                               head_dim, pointer(out))
    assert status == 0
    prefix = cache[:, :, :start + new].double()
    expected = plain_attention(q.double(), prefix[0], prefix[1], start)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-6)


def test_silu_mul_matches_swiglu(library) -> None:
    gate_up = torch.cat((torch.linspace(-100.0, 100.0, 3 * 768).view(3, 768),
                         torch.randn(3, 768)), dim=1)
    out = torch.empty(3, 768)
    library.qg_silu_mul(pointer(gate_up), pointer(out), 3, 768)
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(out.double(), F.silu(gate) * up, atol=1e-6, rtol=1e-6)


def test_the_guard_takes_the_c_step_for_short_fp32_cpu_steps(
        tiny_guard: StreamGuard, library, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = tiny_guard.fast
    assert fast.cpu_step is not None and fast.cpu_step.library is library
    eager_steps = []
    eager = fast.forward
    monkeypatch.setattr(fast, "forward", lambda ids, *a: eager_steps.append(len(ids)) or
                        eager(ids, *a))
    state = tiny_guard.open_stream()
    for count in (40, 1, MAX_TOKENS, MAX_TOKENS + 1, 3):
        tiny_guard.moderate(state, list(range(1, count + 1)), "assistant")
    tiny_guard.close_stream(state)
    assert eager_steps == [40, MAX_TOKENS + 1]


@pytest.mark.parametrize("chunk", [1, 3, C_ATTENTION_TOKENS, C_ATTENTION_TOKENS + 1, MAX_TOKENS])
def test_c_step_equals_eager_step_over_a_stream(tiny_guard: StreamGuard, chunk: int) -> None:
    fast = tiny_guard.fast
    ids = torch.randint(0, 151936, (64,), generator=torch.Generator().manual_seed(chunk))
    c_state, eager_state = tiny_guard.open_stream(), tiny_guard.open_stream()
    c_state.cache.ensure(80, keep=0)
    eager_state.cache.ensure(80, keep=0)
    with torch.inference_mode():
        fast.forward(ids[:20], c_state.cache.buffer, 0)  # same prompt, eager, in both
        fast.forward(ids[:20], eager_state.cache.buffer, 0)
        for start in range(20, 64, chunk):
            piece = ids[start:start + chunk]
            got = fast.cpu_step(piece, c_state.cache.buffer, start)
            expected = fast.forward(piece, eager_state.cache.buffer, start)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_state.cache.buffer[..., :64, :],
                               eager_state.cache.buffer[..., :64, :], atol=1e-5, rtol=1e-5)
    tiny_guard.close_stream(c_state)
    tiny_guard.close_stream(eager_state)


def test_c_step_hidden_states_match_transformers(tiny_guard: StreamGuard,
                                                 tiny_checkpoint: Path) -> None:
    hf = load_hf_backbone(tiny_checkpoint, tiny_guard.config, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 151936, (30,), generator=torch.Generator().manual_seed(3))
    state = tiny_guard.open_stream()
    with torch.inference_mode():
        expected = hf(input_ids=ids[None], use_cache=False).last_hidden_state[0]
        hidden = [tiny_guard.fast.cpu_step(ids[i:i + 1], state.cache.buffer, i)
                  for i in range(30)]
    tiny_guard.close_stream(state)
    torch.testing.assert_close(torch.cat(hidden), expected, atol=1e-4, rtol=1e-4)


def test_a_step_past_the_buffer_is_refused(tiny_guard: StreamGuard) -> None:
    state = tiny_guard.open_stream()
    buffer = state.cache.buffer
    before = buffer.clone()
    with pytest.raises(ValueError, match="capacity"):
        tiny_guard.fast.cpu_step(torch.tensor([1, 2]), buffer, buffer.shape[3] - 1)
    assert torch.equal(buffer, before)
    tiny_guard.close_stream(state)


def test_disabled_by_environment_runs_the_eager_step(tiny_checkpoint: Path,
                                                     tiny_guard: StreamGuard,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_step.DISABLE_ENV, "0")
    cpu_step.load.cache_clear()
    try:
        eager = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu")
    finally:
        cpu_step.load.cache_clear()
    assert eager.fast.cpu_step is None
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


def _rope(head_dim: int, start: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    config = replace(config_for("tiny"), head_dim=head_dim, max_position_embeddings=start + new)
    cos, sin = rope_tables(config, Rotary(head_dim, config.rope_theta).inv_freq, torch.float32)
    return cos[start:start + new].contiguous(), sin[start:start + new].contiguous()


def _score(guard: StreamGuard, ids: list[int]) -> torch.Tensor:
    state = guard.open_stream()
    guard.moderate(state, ids[:20], "user")
    risks = [guard.moderate(state, token, "assistant").risk_probs for token in ids[20:]]
    guard.close_stream(state)
    return torch.cat(risks)
