"""The paged runner (runtime/paged.py) against the module-by-module reference: the torch ops on
CPU, the Triton ops under the interpreter, and on CUDA the captured graphs, StreamGuard as a batch
of one, the engine, pool exhaustion and concurrent callers."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path

import pytest
import torch

from qguard_stream import StreamGuard
from qguard_stream.kvcache.paged import BlockPool, BlockTable, PoolExhaustedError
from qguard_stream.runtime.outputs import GuardScores
from qguard_stream.runtime.paged import Chunk, PagedRunner, StepMeta, fill_meta, token_buckets

from interpreter import run_interpreted

# (token count, role) per call: a prompt, single tokens, odd chunks, a 16-token chunk (the
# kernel's largest), a user turn in the middle, a long chunk (gathered attention), one more token.
CALLS = [(23, "user"), (1, "assistant"), (1, "assistant"), (3, "assistant"), (1, "assistant"),
         (16, "assistant"), (5, "user"), (70, "assistant"), (1, "assistant")]
BLOCK = 16


def call_ids(seed: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151936, (n,), generator=gen) for n, _ in CALLS]


def reference_probs(guard: StreamGuard, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """Risk probs of every call through the module-by-module path, one session."""
    state = guard.open_stream()
    out = [guard.moderate(state, chunk, role).risk_probs for chunk, (_, role) in zip(ids, CALLS)]
    guard.close_stream(state)
    return out


def runner_probs(runner: PagedRunner, pool: BlockPool, ids: list[torch.Tensor],
                 sessions: int = 1) -> list[list[torch.Tensor]]:
    """Feed CALLS to `sessions` sessions at once (each step holds every session's chunk);
    returns risk probs [session][call]."""
    tables = [BlockTable(pool.block_size) for _ in range(sessions)]
    out: list[list[torch.Tensor]] = [[] for _ in range(sessions)]
    start = 0
    for chunk, (count, role) in zip(ids, CALLS):
        for table in tables:
            table.grow(pool, start + count)
        results = runner.forward([Chunk(t, start, chunk, role) for t in tables])
        for s, (risk, _) in enumerate(results):
            out[s].append(risk)
        start += count
    for table in tables:
        table.shrink(pool, 0)
    return out


@pytest.fixture(scope="module")
def core_guard(tiny_checkpoint: Path) -> StreamGuard:
    return StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", fast_path=False)


def heads_of(guard: StreamGuard) -> GuardScores:
    return GuardScores({"user": guard.model.query, "assistant": guard.model.response})


def test_token_buckets_are_powers_of_two_then_multiples_of_eight() -> None:
    assert token_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert token_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert token_buckets(3) == [1, 2, 3]


@pytest.mark.parametrize("c_step", [True, False])
def test_cpu_runner_equals_the_reference(tiny_guard: StreamGuard, core_guard: StreamGuard,
                                         c_step: bool) -> None:
    """With the C step (chunks of <= 16 tokens: every session's attention in one C call over the
    pool) and with the torch ops (each session's context gathered)."""
    pool = BlockPool(tiny_guard.config, 64, BLOCK, torch.device("cpu"), torch.float32)
    runner = PagedRunner(tiny_guard.fast, heads_of(tiny_guard), pool, use_c_step=c_step)
    assert not runner.triton and not runner.captured
    assert (runner.cpu_step is not None) == c_step
    ids = call_ids()
    expected = reference_probs(core_guard, ids)
    batched = runner_probs(runner, pool, ids, sessions=3)
    for session in batched:
        for got, want in zip(session, expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert pool.used_blocks == 0


INTERPRETED_WORKER = """
import sys, torch
from qguard_stream import StreamGuard
from qguard_stream.kvcache.paged import BlockPool, BlockTable
from qguard_stream.runtime.outputs import GuardScores
from qguard_stream.runtime.paged import Chunk, PagedRunner
path, ids, tests = torch.load(sys.argv[1])
sys.path.insert(0, tests)
from test_paged_runner import runner_probs
guard = StreamGuard.from_pretrained(path, device="cpu")
pool = BlockPool(guard.config, 64, 16, torch.device("cpu"), torch.float32)
heads = GuardScores({"user": guard.model.query, "assistant": guard.model.response})
runner = PagedRunner(guard.fast, heads, pool, use_triton=True, use_graphs=False)
from qguard_stream.kernels import paged_attention
torch.save({"interpreted": runner.triton and paged_attention.INTERPRETED,
            "probs": runner_probs(runner, pool, ids, sessions=2)}, sys.argv[2])
"""


def test_triton_ops_runner_equals_the_reference_under_the_interpreter(
        tiny_checkpoint: Path, core_guard: StreamGuard, tmp_path: Path) -> None:
    ids = call_ids()
    inputs = (str(tiny_checkpoint), ids, str(Path(__file__).parent))
    result = run_interpreted(INTERPRETED_WORKER, inputs, tmp_path)
    assert result["interpreted"]
    expected = reference_probs(core_guard, ids)
    for session in result["probs"]:
        for got, want in zip(session, expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_cuda_graphs_need_a_cuda_model_and_the_triton_ops(tiny_guard: StreamGuard) -> None:
    pool = BlockPool(tiny_guard.config, 4, BLOCK, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="CUDA graphs"):
        PagedRunner(tiny_guard.fast, heads_of(tiny_guard), pool, use_graphs=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_concurrent_callers_on_one_guard_get_their_own_sessions_verdicts(
        tiny_guard: StreamGuard, tiny_checkpoint: Path, device: str) -> None:
    """Four threads, each streaming its own session on one guard (on CUDA: one paged runner and
    its captured graphs shared by all): each gets exactly what it gets alone."""
    if device == "cuda":
        tiny_guard = StreamGuard.from_pretrained(tiny_checkpoint, device="cuda",
                                                 dtype=torch.float32, kv_memory_gb=0.05)
    scripts = [call_ids(seed) for seed in range(4)]
    expected = [reference_probs(tiny_guard, ids) for ids in scripts]
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            results[index] = reference_probs(tiny_guard, scripts[index])
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == 4
    for index in range(4):
        for got, want in zip(results[index], expected[index]):
            torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-6, rtol=0)


# ---- CUDA ----------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_stream_guard_equals_the_reference(tiny_checkpoint: Path, core_guard: StreamGuard,
                                                graphs: bool) -> None:
    guard = StreamGuard.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.float32,
                                        use_cuda_graphs=graphs, kv_memory_gb=0.01)
    ids = call_ids()
    got = reference_probs(guard, ids)  # through StreamGuard.moderate: the paged runner
    assert bool(guard.paged_runtime()[1].captured) == graphs
    for g, want in zip(got, reference_probs(core_guard, ids)):
        torch.testing.assert_close(g.cpu(), want, atol=1e-4, rtol=0)


@cuda
def test_cuda_engine_batch_equals_one_session(tiny_checkpoint: Path,
                                              core_guard: StreamGuard) -> None:
    guard = StreamGuard.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.float32)
    pool = BlockPool(guard.config, 256, BLOCK, guard.device, guard.dtype)
    runner = PagedRunner(guard.fast, heads_of(guard), pool, max_graph_tokens=64)
    assert runner.captured == token_buckets(64)
    ids = call_ids()
    expected = reference_probs(core_guard, ids)
    for session in runner_probs(runner, pool, ids, sessions=5):
        for got, want in zip(session, expected):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_pool_exhaustion_is_typed_and_blocks_come_back(tiny_checkpoint: Path,
                                                       device: str) -> None:
    guard = StreamGuard.from_pretrained(tiny_checkpoint, device=device, kv_memory_gb=0.0005)
    pool = guard.paged_runtime()[0]
    state = guard.open_stream()
    with pytest.raises(PoolExhaustedError):
        guard.moderate(state, list(range(pool.num_blocks * pool.block_size + 1)), "user")
    assert state.length == 0 and pool.used_blocks == 0
    guard.moderate(state, list(range(pool.block_size + 10)), "user")  # two blocks
    used = pool.used_blocks
    guard.rollback(state, 10)
    assert pool.used_blocks < used
    del state
    gc.collect()
    assert pool.used_blocks == 0


def test_the_cpu_pool_commits_memory_only_as_blocks_are_written(tiny_checkpoint: Path) -> None:
    """A 2 GiB budget on the CPU is address space: resident memory grows by what the sessions
    write, not by the budget."""
    def resident_bytes() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc")
    guard = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", kv_memory_gb=2.0)
    before = resident_bytes()
    state = guard.open_stream()
    guard.moderate(state, list(range(100)), "user")
    pool = guard.paged_runtime()[0]
    assert pool.nbytes() >= 2 * 2**30 * 0.99
    assert resident_bytes() - before < 256 * 2**20
    guard.close_stream(state)


def flash_attn_with_kvcache_formula(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                    cache_seqlens: torch.Tensor, block_table: torch.Tensor,
                                    softmax_scale: float, causal: bool) -> torch.Tensor:
    """flash-attn 2's documented contract for flash_attn_with_kvcache over a paged cache, as a
    plain formula (flash-attn needs a CUDA GPU): q [B, Lq, H, D]; k/v_cache [num_blocks, page,
    KV, D] with page a multiple of 256 and the last dim contiguous; cache_seqlens [B] int32;
    block_table [B, max_blocks] int32; causal masks align to the bottom right (query i of Lq sees
    keys up to cache_seqlens - Lq + i); a query that sees no key outputs zeros."""
    assert k_cache.shape[1] % 256 == 0 and k_cache.stride(-1) == 1 and causal
    assert cache_seqlens.dtype == block_table.dtype == torch.int32
    batch, width, heads, dim = q.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        length = int(cache_seqlens[b])
        blocks = block_table[b, :-(-length // page)].long()
        keys = k_cache[blocks].reshape(-1, kv_heads, dim)[:length].repeat_interleave(
            heads // kv_heads, dim=1).double()
        values = v_cache[blocks].reshape(-1, kv_heads, dim)[:length].repeat_interleave(
            heads // kv_heads, dim=1).double()
        scores = torch.einsum("qhd,khd->hqk", q[b].double(), keys) * softmax_scale
        seen = torch.arange(length)[None, :] <= (length - width + torch.arange(width))[:, None]
        scores = scores.masked_fill(~seen, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[b] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


def test_flash_attn_path_reads_the_pool_in_place_and_equals_the_reference(
        tiny_guard: StreamGuard, core_guard: StreamGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's flash-attn path (queries packed end-aligned per session, the pool's block
    tables and lengths passed as they are) against the module-by-module reference, with
    flash-attn's function standing as its documented formula: three sessions whose chunks
    differ in length within each step (prompts of 23, 70 and 5 tokens, then 1-40 tokens)."""
    from qguard_stream.runtime import attention

    calls: list[tuple[int, int]] = []

    def flash(q: torch.Tensor, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(q.shape[:2]))
        return flash_attn_with_kvcache_formula(q, *args, **kwargs)

    monkeypatch.setattr(attention, "flash_attn_with_kvcache", flash)
    pool = BlockPool(tiny_guard.config, 8, 256, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="multiple of 256"):
        PagedRunner(tiny_guard.fast, heads_of(tiny_guard),
                    BlockPool(tiny_guard.config, 8, 16, torch.device("cpu"), torch.float32),
                    use_flash=True)
    runner = PagedRunner(tiny_guard.fast, heads_of(tiny_guard), pool, use_c_step=False,
                         use_flash=True)
    assert runner.flash
    gen = torch.Generator().manual_seed(11)
    steps = [[(23, "user"), (70, "user"), (5, "user")], [(1, "assistant"), (40, "assistant"),
                                                        (3, "assistant")],
             [(16, "assistant"), (1, "assistant"), (1, "assistant")],
             [(300, "assistant"), (2, "user"), (7, "assistant")]]
    tables = [BlockTable(pool.block_size) for _ in range(3)]
    lengths, got = [0, 0, 0], [[], [], []]
    fed: list[list[tuple[torch.Tensor, str]]] = [[], [], []]
    for step in steps:
        chunks = []
        for s, (count, role) in enumerate(step):
            ids = torch.randint(0, 151936, (count,), generator=gen)
            tables[s].grow(pool, lengths[s] + count)
            chunks.append(Chunk(tables[s], lengths[s], ids, role))
            fed[s].append((ids, role))
            lengths[s] += count
        for s, (risk, _) in enumerate(runner.forward(chunks)):
            got[s].append(risk)
    assert calls and calls[0] == (3, 70) and calls[-1] == (3, 300)
    for s in range(3):
        state = core_guard.open_stream()
        for (ids, role), risk in zip(fed[s], got[s]):
            torch.testing.assert_close(risk, core_guard.moderate(state, ids, role).risk_probs,
                                       atol=1e-5, rtol=0)
        core_guard.close_stream(state)
        tables[s].shrink(pool, 0)
    assert pool.used_blocks == 0


def flash_attn_installed() -> bool:
    from qguard_stream.runtime import attention

    return attention.flash_attn_with_kvcache is not None


@pytest.mark.skipif(not torch.cuda.is_available() or not flash_attn_installed(),
                    reason="needs CUDA and flash-attn")
def test_cuda_flash_attn_path_equals_the_gathered_path(tiny_checkpoint: Path) -> None:
    """The real flash-attn over a pool of 256-token blocks against the gathered SDPA path (bf16;
    chunks past 16 tokens and, with the Triton ops off, every step)."""
    guard = StreamGuard.from_pretrained(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    cuda, ids = torch.device("cuda"), call_ids()
    results = []
    for block, flash in ((256, True), (16, False)):
        pool = BlockPool(guard.config, 8 if block == 256 else 64, block, cuda, torch.bfloat16)
        runner = PagedRunner(guard.fast, heads_of(guard), pool, use_triton=False,
                             use_graphs=False, use_flash=flash)
        results.append(runner_probs(runner, pool, ids, sessions=2))
    for flash_session, plain_session in zip(*results):
        for got, want in zip(flash_session, plain_session):
            torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


def test_step_metadata_packs_every_field_and_table_by_hand() -> None:
    """fill_meta against hand-built fields: rows and sessions past the chunks are padding
    (slots and row_seq -1, the rest 0), each session's table row holds its blocks in order and
    the columns past them are zero up to the widest table in the step and left as they were
    after it."""
    page, max_blocks = 4, 6
    chunks = []
    for start, ids, blocks, role in [(5, [7, 8], [9, 2], "user"), (0, [3], [4], "assistant"),
                                     (11, [1, 2, 6], [0, 5, 8, 1], "assistant")]:
        table = BlockTable(page)
        table.blocks = blocks
        chunks.append(Chunk(table, start, torch.tensor(ids), role))
    buffer = torch.full((StepMeta.size(8, 4, max_blocks),), -7, dtype=torch.int32)
    meta = StepMeta.view(buffer, 8, 4, max_blocks)
    fill_meta(meta, chunks, page)
    assert meta.token_ids.tolist() == [7, 8, 3, 1, 2, 6, 0, 0]
    assert meta.positions.tolist() == [5, 6, 0, 11, 12, 13, 0, 0]
    # slot = block of the position * page + offset: 5 -> blocks[1]=2 -> 9, 6 -> 10, 0 -> 16,
    # 11 -> blocks[2]=8 -> 35, 12 -> blocks[3]=1 -> 4, 13 -> 5
    assert meta.slots.tolist() == [9, 10, 16, 35, 4, 5, -1, -1]
    assert meta.row_seq.tolist() == [0, 0, 1, 2, 2, 2, -1, -1]
    assert meta.user.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert meta.q_start.tolist() == [0, 2, 3, 0]
    assert meta.q_len.tolist() == [2, 1, 3, 0]
    assert meta.ctx_len.tolist() == [7, 1, 14, 0]
    assert meta.block_tables.tolist() == [[9, 2, 0, 0, -7, -7], [4, 0, 0, 0, -7, -7],
                                          [0, 5, 8, 1, -7, -7], [-7] * 6]
