"""Engine: batched ragged forward over a paged KV pool, against StreamGuard (one session at a time,
its own contiguous cache) as the reference."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from qguard_stream import ForeignSessionError, StreamClosedError, StreamGuard
from qguard_stream.checkpoints import config_for
from qguard_stream.engine import (
    AsyncEngine,
    Engine,
    EngineSettings,
    PoolExhaustedError,
    PoolTooSmallError,
    SessionBusyError,
)
from qguard_stream.kvcache.paged import (
    BlockPool,
    BlockTable,
    advise_huge_pages,
    blocks_for_budget,
    budget_tokens,
    bytes_per_token,
    default_block_size,
)

from oracles import score_in_one_session as reference

VOCAB = 151936
TOLERANCE = 1e-4


def random_ids(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(count)]


def assert_same_verdicts(actual, expected) -> None:
    assert actual.positions == expected.positions
    assert actual.token_ids == expected.token_ids
    assert actual.risk_ids == expected.risk_ids
    assert actual.category_ids == expected.category_ids
    torch.testing.assert_close(actual.risk_probs, expected.risk_probs, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(actual.category_probs, expected.category_probs, atol=TOLERANCE,
                               rtol=0)



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def engine(tiny_guard: StreamGuard) -> Engine:
    # Small blocks, so sessions' positions interleave across many non-contiguous blocks.
    return Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=32768))


@pytest.fixture(autouse=True)
def pool_left_empty(request: pytest.FixtureRequest):
    yield
    if "engine" in request.fixturenames:
        engine = request.getfixturevalue("engine")
        assert engine.pool.used_blocks == 0, "a test leaked KV blocks"
        assert not engine.sessions


TARGET_CHUNKS = [(20, "user"), (1, "assistant"), (9, "assistant"), (1, "assistant"),
                 (16, "assistant"), (3, "user"), (1, "assistant")]


def target_script(seed: int) -> list[tuple[list[int], str]]:
    rng = random.Random(seed)
    return [(random_ids(rng, size), role) for size, role in TARGET_CHUNKS]


def run_with_others(engine: Engine, script: list[tuple[list[int], str]], others: int,
                    seed: int) -> list:
    """Run the target's chunks; before each, every other session queues a chunk of random size
    and role, so each target step is batched with `others` sessions of different lengths."""
    rng = random.Random(seed)
    target = engine.open()
    companions = [engine.open() for _ in range(others)]
    engine.moderate_many([(s, random_ids(rng, rng.randint(1, 40)), rng.choice(("user",
                          "assistant"))) for s in companions])
    results = []
    for ids, role in script:
        futures = [engine.submit(target, ids, role)]
        for session in companions:
            futures.append(engine.submit(session, random_ids(rng, rng.randint(1, 12)),
                                         rng.choice(("user", "assistant"))))
        assert engine.step() == others + 1  # everyone in one batched forward
        results.append(futures[0].result())
        assert all(future.done() for future in futures)
    for session in (target, *companions):
        engine.close(session)
    return results


def test_settle_heap_collects_the_garbage_then_freezes_what_is_alive() -> None:
    """settle_heap: a reference cycle already garbage is collected (its finalizer runs) before
    the objects alive are frozen (exempt from full collections)."""
    import weakref

    from qguard_stream.engine import settle_heap

    class Node:
        pass

    node = Node()
    node.loop = node
    fired: list[int] = []
    weakref.finalize(node, fired.append, 1)
    del node
    alive = len(gc.get_objects())
    try:
        settle_heap()
        assert fired == [1]
        assert gc.get_freeze_count() >= alive // 2
    finally:
        gc.unfreeze()


def test_engine_alone_matches_stream_guard(engine: Engine, tiny_guard: StreamGuard) -> None:
    script = target_script(seed=3)
    session = engine.open()
    actual = [engine.moderate(session, ids, role) for ids, role in script]
    engine.close(session)
    for got, expected in zip(actual, reference(tiny_guard, script)):
        assert_same_verdicts(got, expected)


@pytest.mark.parametrize("others", [1, 7, 63])
def test_verdicts_batch_invariant(engine: Engine, others: int) -> None:
    script = target_script(seed=11)
    alone = run_with_others(engine, script, 0, seed=0)
    batched = run_with_others(engine, script, others, seed=others)
    for got, expected in zip(batched, alone):
        assert_same_verdicts(got, expected)


def test_every_batched_session_matches_its_own_reference(engine: Engine,
                                                         tiny_guard: StreamGuard) -> None:
    rng = random.Random(5)
    scripts = [[(random_ids(rng, rng.randint(1, 10)), rng.choice(("user", "assistant")))
                for _ in range(rng.randint(1, 4))] for _ in range(12)]
    sessions = [engine.open() for _ in scripts]
    chunks = [(s, ids, role) for s, script in zip(sessions, scripts) for ids, role in script]
    results = iter(engine.moderate_many(chunks))
    for session, script in zip(sessions, scripts):
        for expected in reference(tiny_guard, script):
            assert_same_verdicts(next(results), expected)
        engine.close(session)


def test_session_with_several_queued_chunks_runs_them_in_order(engine: Engine) -> None:
    session = engine.open()
    first, second = engine.submit(session, [1, 2, 3], "user"), engine.submit(session, [4], "user")
    assert engine.step() == 1 and first.done() and not second.done()
    assert engine.step() == 1 and second.result().positions == range(3, 4)
    assert session.token_ids == [1, 2, 3, 4]
    engine.close(session)


# ---- pool sizing and exhaustion --------------------------------------------------------------
def test_pool_sized_by_memory_budget(tiny_guard: StreamGuard) -> None:
    config = tiny_guard.config  # tiny: 2 layers, 2 kv heads, head_dim 32, fp32
    per_token = 2 * 2 * 2 * 32 * 4
    assert bytes_per_token(config, torch.float32) == per_token
    assert blocks_for_budget(config, torch.float32, 16, 0.001, None) == \
        int(0.001 * 2**30) // (16 * per_token)
    assert blocks_for_budget(config, torch.float32, 16, None, 100) == 7
    engine = Engine(tiny_guard, EngineSettings(block_size=16, kv_memory_gb=0.001))
    assert engine.pool.nbytes() == engine.pool.num_blocks * 16 * per_token
    with pytest.raises(ValueError, match="kv_memory_gb"):
        EngineSettings(kv_memory_gb=1.0, max_tokens=10)


def test_default_block_size_is_64_on_the_cpu_and_16_on_cuda(tiny_guard: StreamGuard) -> None:
    """Unless asked otherwise, CPU pools (the engine's and a StreamGuard's) hold 64 tokens per
    block and CUDA pools 16; a budget in tokens rounds up to whole blocks, one spare each."""
    assert default_block_size("cpu") == 64 and default_block_size(torch.device("cuda")) == 16
    assert Engine(tiny_guard, EngineSettings(max_tokens=1000)).pool.block_size == 64
    assert Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=64)).pool.block_size == 8
    state = tiny_guard.open_stream()
    assert tiny_guard.pool is not None and tiny_guard.pool.block_size == 64
    tiny_guard.close_stream(state)
    assert budget_tokens(3, 100, 64) == 3 * (2 + 1) * 64 and budget_tokens(1, 64, 64) == 128
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        EngineSettings(block_size=0)


@pytest.fixture()
def small_engine(tiny_guard: StreamGuard) -> Engine:
    return Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=64))  # 8 blocks


def test_exhausted_pool_raises_and_leaves_sessions_intact(small_engine: Engine,
                                                          tiny_guard: StreamGuard) -> None:
    rng = random.Random(1)
    a_ids, b_ids, more = random_ids(rng, 40), random_ids(rng, 32), random_ids(rng, 8)
    a, b = small_engine.open(), small_engine.open()
    small_engine.moderate(a, a_ids, "user")  # 5 blocks of 8
    with pytest.raises(PoolExhaustedError, match="need 4 block"):
        small_engine.moderate(b, b_ids, "user")
    assert b.length == 0 and b.table.blocks == [] and small_engine.pool.used_blocks == 5
    verdicts = small_engine.moderate(b, b_ids[:24], "user")  # exactly the 3 free blocks
    assert_same_verdicts(verdicts, reference(tiny_guard, [(b_ids[:24], "user")])[0])
    small_engine.close(b)
    got = small_engine.moderate(a, more, "assistant")
    assert_same_verdicts(got, reference(tiny_guard, [(a_ids, "user"), (more, "assistant")])[1])
    small_engine.close(a)
    assert small_engine.pool.used_blocks == 0


def test_request_larger_than_pool_is_refused_at_once_even_when_waiting(
        tiny_guard: StreamGuard) -> None:
    engine = Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=64,
                                               on_pool_exhausted="wait", pool_wait_timeout_s=30))
    session = engine.open()
    with pytest.raises(PoolTooSmallError, match="more than the pool's 8 blocks"):
        engine.moderate(session, list(range(65)), "user")
    assert engine.pool.used_blocks == 0 and session.length == 0


def test_wait_mode_times_out_with_typed_error(tiny_guard: StreamGuard) -> None:
    engine = Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=16,
                                               on_pool_exhausted="wait", pool_wait_timeout_s=0.2))
    holder, waiter = engine.open(), engine.open()
    engine.moderate(holder, list(range(16)), "user")
    with pytest.raises(PoolExhaustedError, match="after waiting 0.2s"):
        engine.moderate(waiter, [1], "user")
    assert waiter.length == 0 and engine.pool.used_blocks == 2


def test_wait_mode_proceeds_when_another_thread_frees_blocks(tiny_guard: StreamGuard) -> None:
    engine = Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=16,
                                               on_pool_exhausted="wait", pool_wait_timeout_s=20))
    holder, waiter = engine.open(), engine.open()
    engine.moderate(holder, list(range(16)), "user")
    closer = threading.Timer(0.3, engine.close, args=(holder,))
    closer.start()
    verdicts = engine.moderate(waiter, [5, 6, 7], "user")
    closer.join()
    assert_same_verdicts(verdicts, reference(tiny_guard, [([5, 6, 7], "user")])[0])
    engine.close(waiter)
    assert engine.pool.used_blocks == 0


async def test_async_wait_mode_proceeds_when_a_session_closes(tiny_guard: StreamGuard) -> None:
    engine = Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=16,
                                               on_pool_exhausted="wait", pool_wait_timeout_s=20))
    runtime = AsyncEngine(engine)
    holder, waiter = await runtime.open(), await runtime.open()
    await runtime.moderate(holder, list(range(16)), "user")

    async def close_later() -> None:
        await asyncio.sleep(0.3)
        await runtime.close(holder)

    verdicts, _ = await asyncio.gather(runtime.moderate(waiter, [5, 6, 7], "user"),
                                       close_later())
    assert_same_verdicts(verdicts, reference(tiny_guard, [([5, 6, 7], "user")])[0])
    await runtime.close(waiter)
    await runtime.aclose()
    assert engine.pool.used_blocks == 0


def test_two_chunks_waiting_for_blocks_on_one_session_get_distinct_positions(
        tiny_guard: StreamGuard) -> None:
    """Both chunks wait (the lock released) until blocks are freed; each must then read the
    session's end anew, so the second lands after the first, not over it."""
    engine = Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=16,
                                               on_pool_exhausted="wait", pool_wait_timeout_s=20))
    holder, shared = engine.open(), engine.open()
    engine.moderate(holder, list(range(16)), "user")
    chunks = {"first": [11, 12, 13], "second": [21, 22]}
    results: dict[str, object] = {}

    def feed(name: str) -> None:
        try:
            results[name] = engine.moderate(shared, chunks[name], "user")
        except Exception as error:  # reported by the asserts below
            results[name] = error

    threads = [threading.Thread(target=feed, args=(name,)) for name in chunks]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # both waiting on the exhausted pool (if one is late, it simply goes second)
    engine.close(holder)
    for thread in threads:
        thread.join(timeout=30)
    order = sorted(chunks, key=lambda name: results[name].positions.start)
    assert [results[name].positions for name in order] == \
        [range(0, len(chunks[order[0]])), range(len(chunks[order[0]]), 5)]
    expected = reference(tiny_guard, [(chunks[name], "user") for name in order])
    for name, want in zip(order, expected):
        assert_same_verdicts(results[name], want)
    assert shared.length == 5 and shared.token_ids == chunks[order[0]] + chunks[order[1]]
    engine.close(shared)
    assert engine.pool.used_blocks == 0


def test_sessions_of_moderate_many_waiting_for_blocks_refuse_a_rollback(
        tiny_guard: StreamGuard) -> None:
    """While moderate_many waits for blocks for a later chunk, an earlier chunk of the same call
    holds blocks: its session must refuse a rollback from another thread (the blocks would be
    freed under the chunk), and the call must still score both chunks exactly."""
    engine = Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=16,
                                               on_pool_exhausted="wait", pool_wait_timeout_s=20))
    holder, first, second = engine.open(), engine.open(), engine.open()
    engine.moderate(holder, list(range(8)), "user")  # one block left: first takes it
    results: list[object] = []
    caller = threading.Thread(target=lambda: results.append(
        engine.moderate_many([(first, [1, 2, 3], "user"), (second, [4, 5], "user")])))
    caller.start()
    deadline = time.monotonic() + 10
    while not engine.has_queued() and time.monotonic() < deadline:  # first queued, second waits
        time.sleep(0.01)
    with pytest.raises(SessionBusyError):
        engine.rollback(first, 0)
    engine.close(holder)
    caller.join(timeout=30)
    got_first, got_second = results[0]
    assert_same_verdicts(got_first, reference(tiny_guard, [([1, 2, 3], "user")])[0])
    assert_same_verdicts(got_second, reference(tiny_guard, [([4, 5], "user")])[0])
    engine.close(first)
    engine.close(second)
    assert engine.pool.used_blocks == 0


# ---- rollback, close, bad input ----------------------------------------------------------------
def test_rollback_frees_blocks_past_new_length(engine: Engine, tiny_guard: StreamGuard) -> None:
    rng = random.Random(2)
    prompt, first, second = random_ids(rng, 30), random_ids(rng, 10), random_ids(rng, 7)
    session = engine.open()
    engine.moderate(session, prompt, "user")
    engine.moderate(session, first, "assistant")
    assert len(session.table.blocks) == 5
    engine.rollback(session, 33)
    assert len(session.table.blocks) == 5 and session.length == 33
    engine.rollback(session, 9)
    assert len(session.table.blocks) == 2 and engine.pool.used_blocks == 2
    got = engine.moderate(session, second, "assistant")
    expected = reference(tiny_guard, [(prompt[:9], "user"), (second, "assistant")])[1]
    assert_same_verdicts(got, expected)
    engine.close(session)


def test_rollback_refused_while_chunks_are_queued(engine: Engine) -> None:
    session = engine.open()
    engine.moderate(session, [1, 2, 3], "user")
    future = engine.submit(session, [4, 5], "assistant")
    with pytest.raises(SessionBusyError, match="queued"):
        engine.rollback(session, 1)
    engine.step()
    assert future.result().positions == range(3, 5) and session.length == 5
    engine.close(session)


def test_close_cancels_queued_chunks_and_frees_blocks(engine: Engine) -> None:
    session = engine.open()
    future = engine.submit(session, list(range(20)), "user")
    assert engine.pool.used_blocks == 3
    engine.close(session)
    with pytest.raises(StreamClosedError):
        future.result()
    assert engine.step() == 0
    with pytest.raises(StreamClosedError):
        engine.submit(session, [1], "user")
    engine.close(session)  # idempotent


@pytest.mark.parametrize(("ids", "role", "error", "match"), [
    ([1, VOCAB], "user", ValueError, f"token id {VOCAB} is out of range"),
    ([1, 2], "system", ValueError, "role must be one of"),
    ([[1, 2]], "user", TypeError, "nested"),
    ([], "user", ValueError, "empty"),
])
def test_bad_input_names_the_value_and_changes_nothing(engine: Engine, ids, role, error,
                                                       match) -> None:
    session = engine.open()
    engine.moderate(session, [7, 8], "user")
    with pytest.raises(error, match=match):
        engine.submit(session, ids, role)
    assert session.token_ids == [7, 8] and session.reserved == 2 and session.queued == 0
    assert engine.pool.used_blocks == 1
    engine.close(session)


def test_session_bounded_by_max_position_embeddings(tiny_guard: StreamGuard) -> None:
    engine = Engine(tiny_guard, EngineSettings(block_size=8, max_tokens=20000))
    session = engine.open()
    limit = tiny_guard.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_position_embeddings={limit}"):
        engine.submit(session, [1] * (limit + 1), "user")
    assert engine.pool.used_blocks == 0


# ---- many sessions -----------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_feed_close(engine: Engine, count: int, rng: random.Random, wave: int = 100) -> None:
    for _ in range(count // wave):
        sessions = [engine.open() for _ in range(wave)]
        engine.moderate_many([(s, random_ids(rng, rng.randint(1, 20)), "user") for s in sessions])
        for session in sessions:
            engine.close(session)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc for RSS")
def test_thousand_sessions_leave_pool_empty_and_memory_flat(engine: Engine) -> None:
    rng = random.Random(9)
    open_feed_close(engine, 100, rng)  # warm allocator caches first
    gc.collect()
    before = rss_bytes()
    open_feed_close(engine, 1000, rng)
    gc.collect()
    growth = rss_bytes() - before
    assert engine.pool.used_blocks == 0 and engine.pool.free_blocks == engine.pool.num_blocks
    assert not engine.sessions and engine.stats().active_sessions == 0
    assert growth < 16 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 1,000 sessions"


def vm_flags_at(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split(" ", 1)[0]
        if "-" in first and ":" not in first:
            low, high = (int(part, 16) for part in first.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return []


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc")
def test_a_cpu_pool_is_advised_onto_huge_pages_and_a_small_tensor_is_not() -> None:
    """The CPU pool's memory carries MADV_HUGEPAGE (smaps flag "hg"), so the kernel backs it
    with 2 MiB pages as blocks are written; a tensor smaller than a huge page is left alone."""
    config = config_for("small")
    pool = BlockPool(config, 1024, 16, torch.device("cpu"), torch.float32)  # 64 MiB
    middle = pool.kv.data_ptr() + pool.nbytes() // 2
    assert "hg" in vm_flags_at(middle)
    assert not advise_huge_pages(torch.empty(1000))
    assert not advise_huge_pages(torch.empty(2**20, device="meta"))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc")
def test_huge_pages_are_not_asked_for_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QGUARD_STREAM_HUGE_PAGES", "0")
    pool = BlockPool(config_for("small"), 1024, 16, torch.device("cpu"), torch.float32)
    assert "hg" not in vm_flags_at(pool.kv.data_ptr() + pool.nbytes() // 2)


def test_block_table_slots_follow_blocks() -> None:
    table = BlockTable(block_size=4)
    table.blocks = [7, 2, 9]
    assert table.slots(2, 10).tolist() == [30, 31, 8, 9, 10, 11, 36, 37]
    assert table.blocks_needed(12) == 0 and table.blocks_needed(13) == 1


def test_async_front_end_scores_concurrent_sessions(engine: Engine,
                                                    tiny_guard: StreamGuard) -> None:
    rng = random.Random(4)
    scripts = [[(random_ids(rng, rng.randint(1, 9)), rng.choice(("user", "assistant")))
                for _ in range(3)] for _ in range(8)]

    async def client(runtime: AsyncEngine, script) -> list:
        session = await runtime.open()
        results = [await runtime.moderate(session, ids, role) for ids, role in script]
        await runtime.close(session)
        return results

    async def main() -> list:
        runtime = AsyncEngine(engine)
        try:
            return await asyncio.gather(*(client(runtime, s) for s in scripts))
        finally:
            await runtime.aclose()

    all_results = asyncio.run(main())
    for results, script in zip(all_results, scripts):
        for got, expected in zip(results, reference(tiny_guard, script)):
            assert_same_verdicts(got, expected)


def test_async_engine_survives_a_new_event_loop(engine: Engine, tiny_guard: StreamGuard) -> None:
    runtime = AsyncEngine(engine)

    async def score(ids: list[int]):
        session = await runtime.open()
        verdicts = await asyncio.wait_for(runtime.moderate(session, ids, "user"), timeout=60)
        await runtime.close(session)
        return verdicts

    first = asyncio.run(score([1, 2, 3]))
    second = asyncio.run(score([4, 5]))  # the first loop and its stepper task are gone
    assert_same_verdicts(first, reference(tiny_guard, [([1, 2, 3], "user")])[0])
    assert_same_verdicts(second, reference(tiny_guard, [([4, 5], "user")])[0])
    asyncio.run(runtime.aclose())


def test_a_session_from_another_engine_is_refused_before_anything_runs(
        engine: Engine, tiny_guard: StreamGuard) -> None:
    """engine_b.moderate(session_of_a) used to score it against b's pool (corrupting a third
    session's K/V) and close() once left a block twice in b's free list."""
    other = Engine(tiny_guard, EngineSettings(max_tokens=256))
    theirs = other.open()
    other.moderate(theirs, [1, 2, 3], "user")
    mine = engine.open()
    engine.moderate(mine, [4, 5], "user")
    free = (engine.pool.free_blocks, other.pool.free_blocks)
    for call in (lambda: engine.moderate(theirs, [6], "assistant"),
                 lambda: engine.submit(theirs, [6], "assistant"),
                 lambda: engine.rollback(theirs, 1), lambda: engine.close(theirs)):
        with pytest.raises(ForeignSessionError, match="another Engine"):
            call()
    assert (engine.pool.free_blocks, other.pool.free_blocks) == free
    assert theirs.token_ids == [1, 2, 3] and not theirs.closed
    assert other.moderate(theirs, [6], "assistant").token_ids == (6,)
    other.close(theirs)
    engine.close(mine)
    assert other.pool.used_blocks == 0
