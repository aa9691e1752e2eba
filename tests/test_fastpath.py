"""The paged runner (runtime/paged.py) and its attention backends agree with the module-by-module
reference and with transformers' Qwen3Model; on CUDA, graph replay agrees with eager steps."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.baselines import load_hf_backbone
from qguard_stream import StreamGuard
from qguard_stream.kvcache.paged import BlockPool, BlockTable
from qguard_stream.models.qwen3 import RMSNorm, Rotary, apply_rotary
from qguard_stream.runtime.attention import _grouped_small, _sdpa
from qguard_stream.runtime.cpu_step import CpuStep
from qguard_stream.runtime.layer import rms_norm
from qguard_stream.runtime.outputs import FinalHidden
from qguard_stream.runtime.paged import Chunk, PagedRunner
from qguard_stream.runtime.weights import rope_tables

# (token count, role) per call: a prompt, single tokens, odd chunks (bucket padding), a long chunk.
CALLS = [(23, "user"), (1, "assistant"), (1, "assistant"), (3, "assistant"), (1, "assistant"),
         (16, "assistant"), (5, "user"), (70, "assistant"), (1, "assistant")]


@pytest.fixture(scope="module")
def core_guard(tiny_checkpoint: Path) -> StreamGuard:
    return StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", fast_path=False)


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    total = sum(n for n, _ in CALLS)
    return torch.randint(0, 151936, (total,), generator=torch.Generator().manual_seed(7))


def run_calls(guard: StreamGuard, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed CALLS; return risk probs [T, 3] and the first 8 category probs [T, 8] of every call."""
    state = guard.open_stream()
    risks, categories, offset = [], [], 0
    for count, role in CALLS:
        verdicts = guard.moderate(state, token_ids[offset:offset + count], role)
        risks.append(verdicts.risk_probs)
        categories.append(verdicts.category_probs[:, :8])
        offset += count
    guard.close_stream(state)
    return torch.cat(risks), torch.cat(categories)


def test_fast_path_verdicts_equal_core_path(tiny_guard: StreamGuard, core_guard: StreamGuard,
                                            token_ids: torch.Tensor) -> None:
    assert tiny_guard.fast is not None and core_guard.fast is None
    fast_risk, fast_category = run_calls(tiny_guard, token_ids)
    core_risk, core_category = run_calls(core_guard, token_ids)
    torch.testing.assert_close(fast_risk, core_risk, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_category, core_category, atol=1e-5, rtol=0)


def test_fast_path_hidden_states_match_transformers(tiny_guard: StreamGuard,
                                                    tiny_checkpoint: Path,
                                                    token_ids: torch.Tensor) -> None:
    hf = load_hf_backbone(tiny_checkpoint, tiny_guard.config, torch.device("cpu"), torch.float32)
    ids = token_ids[:60]
    with torch.inference_mode():
        expected = hf(input_ids=ids[None], use_cache=False).last_hidden_state[0]
    bounds = (0, 20, 21, 22, 37, 60)  # a prompt, single tokens, a 15-token and a 23-token chunk
    for use_c_step in (None, False):  # the C step where it builds, and the torch ops
        hidden = hidden_through_runner(tiny_guard, ids, bounds, use_c_step=use_c_step)
        torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=1e-4)


def hidden_through_runner(guard: StreamGuard, ids: torch.Tensor, bounds: tuple[int, ...],
                          block_size: int = 16, c_library=None, **runner_options) -> torch.Tensor:
    """Final hidden states of one session fed ids[bounds[i]:bounds[i + 1]] chunk by chunk
    through a fresh paged runner over the guard's weights (its C step over `c_library`, a
    variant build of kernels/cpu_step.c, when given)."""
    pool = BlockPool(guard.config, -(-bounds[-1] // block_size) + 2, block_size, guard.device,
                     guard.dtype)
    runner = PagedRunner(guard.fast, FinalHidden(guard.config.hidden_size), pool,
                         **runner_options)
    if c_library is not None:
        runner.cpu_step = CpuStep(guard.fast, pool, c_library)
    BlockTable(block_size).grow(pool, 1)  # another session's block: ours start at slot 16
    table, hidden = BlockTable(block_size), []
    for start, end in itertools.pairwise(bounds):
        table.grow(pool, end)
        hidden += runner.forward([Chunk(table, start, ids[start:end], "user")])
    return torch.cat(hidden)


def test_fused_weights_are_views_of_one_tensor(tiny_guard: StreamGuard) -> None:
    attn = tiny_guard.model.model.layers[0].self_attn
    fused = tiny_guard.fast.layers[0].qkv
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    rows = attn.q_proj.weight.shape[0]
    torch.testing.assert_close(fused[rows:rows + attn.k_proj.weight.shape[0]], attn.k_proj.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_model_rmsnorm(dtype: torch.dtype) -> None:
    reference = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(1.0 + 0.1 * torch.randn(48))
    reference = reference.to(dtype)
    x = (3.0 * torch.randn(5, 48)).to(dtype)
    got = rms_norm(x, reference.weight.detach(), torch.tensor(1e-6))
    assert got.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, reference(x).detach(), atol=tolerance, rtol=tolerance)


def test_rope_tables_match_rotary(tiny_guard: StreamGuard) -> None:
    config = tiny_guard.config
    rotary = Rotary(config.head_dim, config.rope_theta)
    cos_table, sin_table = rope_tables(config, rotary.inv_freq, torch.float32)
    positions = torch.tensor([0, 1, 17, 4000, config.max_position_embeddings - 1])
    x = torch.randn(len(positions), 3, config.head_dim)
    expected = apply_rotary(x, *rotary(positions, torch.float32))
    cos, sin = cos_table[positions, None, :], sin_table[positions, None, :]
    got = x * cos + x.roll(config.head_dim // 2, -1) * sin
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start,new", [(0, 1), (9, 1), (9, 4), (0, 6), (30, 64)])
def test_attention_backends_match_plain_formula(start: int, new: int) -> None:
    kv_heads, group, dim = 2, 3, 16
    generator = torch.Generator().manual_seed(start * 100 + new)
    q = torch.randn(new, kv_heads * group, dim, generator=generator, dtype=torch.float64)
    keys = torch.randn(kv_heads, start + new, dim, generator=generator, dtype=torch.float64)
    values = torch.randn(kv_heads, start + new, dim, generator=generator, dtype=torch.float64)
    expected = plain_attention(q, keys, values, start)
    positions = torch.arange(start + new)
    for backend in (_grouped_small, _sdpa):
        got = backend(q, keys, values, start, positions)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def plain_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    start: int) -> torch.Tensor:
    """Per head, per query, a softmax over the keys at or before the query's position."""
    new, heads, dim = q.shape
    group = heads // keys.shape[0]
    out = torch.empty(new, heads, dim, dtype=q.dtype)
    for head in range(heads):
        k, v = keys[head // group], values[head // group]
        for i in range(new):
            visible = start + i + 1
            weights = F.softmax(k[:visible] @ q[i, head], dim=0)
            out[i, head] = weights @ v[:visible]
    return out.reshape(new, heads * dim)


def test_rollback_then_new_tokens_on_fast_path_equals_fresh_session(
        tiny_guard: StreamGuard, token_ids: torch.Tensor) -> None:
    state = tiny_guard.open_stream()
    tiny_guard.moderate(state, token_ids[:40], "user")
    tiny_guard.rollback(state, 25)
    after = tiny_guard.moderate(state, token_ids[50:53], "assistant")
    fresh = tiny_guard.open_stream()
    tiny_guard.moderate(fresh, token_ids[:25], "user")
    expected = tiny_guard.moderate(fresh, token_ids[50:53], "assistant")
    torch.testing.assert_close(after.risk_probs, expected.risk_probs, atol=1e-6, rtol=0)
    tiny_guard.close_stream(state)
    tiny_guard.close_stream(fresh)


def test_out_of_range_int_id_raises_and_leaves_session_unchanged(tiny_guard: StreamGuard) -> None:
    state = tiny_guard.open_stream()
    tiny_guard.moderate(state, [1, 2, 3], "user")
    with pytest.raises(ValueError, match="151936"):
        tiny_guard.moderate(state, 151936, "assistant")
    with pytest.raises(ValueError, match="-1"):
        tiny_guard.moderate(state, -1, "assistant")
    assert state.token_ids == [1, 2, 3]
    tiny_guard.close_stream(state)


def test_cuda_graphs_need_the_fast_path(tiny_guard: StreamGuard) -> None:
    with pytest.raises(ValueError, match="fast_path"):
        StreamGuard(tiny_guard.model, use_cuda_graphs=True, fast_path=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_path_equals_eager_path(tiny_checkpoint: Path, token_ids: torch.Tensor) -> None:
    graphed = StreamGuard.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.float32,
                                          use_cuda_graphs=True, kv_memory_gb=0.01)
    eager = StreamGuard.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.float32,
                                        use_cuda_graphs=False, kv_memory_gb=0.01)
    assert graphed.paged_runtime()[1].captured and not eager.paged_runtime()[1].captured
    graph_risk, graph_category = run_calls(graphed, token_ids)
    eager_risk, eager_category = run_calls(eager, token_ids)
    torch.testing.assert_close(graph_risk, eager_risk, atol=1e-4, rtol=0)
    torch.testing.assert_close(graph_category, eager_category, atol=1e-4, rtol=0)


def test_flash_attn_is_never_picked_for_fp32_or_cpu(monkeypatch) -> None:
    from qguard_stream.runtime import attention

    monkeypatch.setattr(attention, "flash_attn_with_kvcache", object())  # "installed"
    cuda = torch.device("cuda")
    assert attention.flash_available(cuda, torch.bfloat16)
    assert attention.flash_available(cuda, torch.float16)
    assert not attention.flash_available(cuda, torch.float32)
    assert not attention.flash_available(torch.device("cpu"), torch.bfloat16)
