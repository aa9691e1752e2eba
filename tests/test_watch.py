"""guard.watch / guard.awatch: verdicts per token, clean stop at a flag, holdback, chunks, async."""

from __future__ import annotations

import asyncio

import pytest
import torch

from qguard_stream import ProbabilityThreshold, StreamGuard
from qguard_stream.checkpoints import make_trigger_checkpoint
from qguard_stream.integrations.watch import FlaggedError
from qguard_stream.template import split_prompt_ids

IM_END = 151645
TRIGGERS = (500, 501)
PROMPT = [151644, 872, 198, 40, 41, IM_END, 198, 151644, 77091, 198]  # user turn + header
CLEAN = [10, 11, 500, 12, 13, 501, 14, 15]  # lone triggers: no adjacent Unsafe pair
FLAGGED = [10, 11, 12, 13, 500, 501, 14, 15, 16]  # pair at indices 4, 5


@pytest.fixture(scope="module")
def guard(tmp_path_factory) -> StreamGuard:
    path = make_trigger_checkpoint(tmp_path_factory.mktemp("trigger"), TRIGGERS)
    return StreamGuard.from_pretrained(path, device="cpu")


def reference(guard: StreamGuard, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Response risk probabilities from one plain session fed as the model card does."""
    user, header = split_prompt_ids(prompt, IM_END)
    state = guard.open_stream()
    for part, role in ((user, "user"), (header, "assistant")):
        if part:
            guard.moderate(state, part, role)
    probs = guard.moderate(state, response, "assistant").risk_probs
    guard.close_stream(state)
    return probs


class Source:
    """A token source that records how far it was pulled."""

    def __init__(self, items, log=None):
        self.items, self.pulled, self.log = list(items), 0, log

    def __iter__(self):
        for item in self.items:
            self.pulled += 1
            if self.log is not None:
                self.log.append(("pulled", item))
            yield item


def test_clean_stream_yields_every_token_with_its_verdict(guard):
    watch = guard.watch(iter(CLEAN), prompt=PROMPT)
    got = list(watch)
    assert [t.token_id for t in got] == CLEAN
    probs = torch.tensor([t.verdict.risk_probs for t in got])
    assert torch.allclose(probs, reference(guard, PROMPT, CLEAN), atol=1e-5)
    assert [t.verdict.position for t in got] == list(range(len(PROMPT), len(PROMPT) + len(CLEAN)))
    result = watch.result
    assert not result.flagged and result.released == CLEAN and result.withheld == []
    assert result.state.closed


def test_flag_stops_pulling_and_reports(guard):
    source = Source(FLAGGED)
    watch = guard.watch(source, prompt=PROMPT)
    got = [t.token_id for t in watch]
    assert got == FLAGGED[:5]  # the flagged token itself is never released
    assert source.pulled == 6
    assert watch.result.withheld == [501]
    d = watch.result.decision
    assert (d.label, d.index, d.token_id) == ("Unsafe", 5, 501)
    assert d.position == len(PROMPT) + 5 and d.start_position == len(PROMPT) + 4


def test_raise_on_flag(guard):
    got = []
    with pytest.raises(FlaggedError) as info:
        for token in guard.watch(iter(FLAGGED), raise_on_flag=True):
            got.append(token.token_id)
    assert got == FLAGGED[:5]
    assert info.value.result.decision.token_id == 501
    assert "Unsafe" in str(info.value)


def test_header_tokens_are_not_judged(guard):
    prompt = [*PROMPT[:6], 500, 501]  # a trigger pair in the assistant header after <|im_end|>
    watch = guard.watch(iter(CLEAN), prompt=prompt)
    assert [t.token_id for t in watch] == CLEAN and not watch.result.flagged


@pytest.mark.parametrize("holdback", [1, 2, 3])
def test_holdback_releases_a_token_only_after_n_later_tokens(guard, holdback):
    log: list = []
    source = Source(CLEAN, log)
    for token in guard.watch(source, holdback=holdback):
        log.append(("got", token.token_id))
    for i, token_id in enumerate(CLEAN):
        got_at = log.index(("got", token_id))
        later = CLEAN[i + holdback] if i + holdback < len(CLEAN) else None
        if later is not None:
            assert log.index(("pulled", later)) < got_at
    assert [e[1] for e in log if e[0] == "got"] == CLEAN  # all released at the end


@pytest.mark.parametrize("holdback", [1, 2, 4])
def test_holdback_withholds_the_flagged_span(guard, holdback):
    watch = guard.watch(iter(FLAGGED), holdback=holdback)
    released = [t.token_id for t in watch]
    assert 500 not in released and 501 not in released
    assert released == FLAGGED[: 5 - holdback]
    assert watch.result.withheld == FLAGGED[5 - holdback: 6]


def spy_forwards(guard, monkeypatch) -> list[int]:
    sizes: list[int] = []
    original = guard.moderate

    def moderate(state, ids, role):
        sizes.append(len(ids))
        return original(state, ids, role)

    monkeypatch.setattr(guard, "moderate", moderate)
    return sizes


def test_chunked_feeding_scores_k_tokens_per_forward(guard, monkeypatch):
    sizes = spy_forwards(guard, monkeypatch)
    watch = guard.watch(iter(CLEAN), chunk=3)
    got = list(watch)
    assert sizes == [3, 3, 2]
    assert [t.token_id for t in got] == CLEAN
    probs = torch.tensor([t.verdict.risk_probs for t in got])
    assert torch.allclose(probs, reference(guard, [], CLEAN), atol=1e-5)


def test_bursts_are_fed_as_one_forward(guard, monkeypatch):
    sizes = spy_forwards(guard, monkeypatch)
    bursts = [CLEAN[:3], torch.tensor(CLEAN[3:5]), CLEAN[5]]
    got = [t.token_id for t in guard.watch(iter(bursts))]
    assert sizes == [3, 2, 1] and got == CLEAN[:6]


def test_flag_inside_a_chunk_withholds_the_rest_of_it(guard):
    watch = guard.watch(iter(FLAGGED), chunk=4)
    released = [t.token_id for t in watch]
    assert released == FLAGGED[:4]
    assert watch.result.withheld == FLAGGED[4:8]  # 500 501 and the chunk's tail


def test_caller_state_is_kept_open_and_can_roll_back(guard):
    state = guard.open_stream()
    watch = guard.watch(iter(FLAGGED), state=state)
    list(watch)
    assert not state.closed and state.token_ids == FLAGGED[:6]
    guard.rollback(state, watch.result.decision.start_position)
    assert state.token_ids == FLAGGED[:4] and state.monitor.stop_decision is None
    guard.close_stream(state)


def test_custom_policy(guard):
    watch = guard.watch(iter(CLEAN), policy=ProbabilityThreshold(0.5, window=1))
    assert [t.token_id for t in watch] == CLEAN[:2]  # flagged at the lone 500
    assert watch.result.decision.rule == "probability_threshold"


def test_async_iterator_matches_sync(guard):
    async def source():
        for token in FLAGGED:
            await asyncio.sleep(0)
            yield token

    async def consume():
        watch = guard.awatch(source(), prompt=PROMPT, holdback=1)
        return [t.token_id async for t in watch], watch.result

    released, result = asyncio.run(consume())
    sync = guard.watch(iter(FLAGGED), prompt=PROMPT, holdback=1)
    assert released == [t.token_id for t in sync] == FLAGGED[:4]
    assert result.decision == sync.result.decision and result.state.closed


def test_async_raise_on_flag(guard):
    async def source():
        for token in FLAGGED:
            yield token

    async def consume():
        return [t async for t in guard.awatch(source(), raise_on_flag=True)]

    with pytest.raises(FlaggedError):
        asyncio.run(consume())


@pytest.mark.parametrize("options, match", [({"holdback": -1}, "holdback"),
                                            ({"chunk": 0}, "chunk"),
                                            ({"policy": "strict"}, "policy")])
def test_bad_options_are_rejected(guard, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        guard.watch(iter(CLEAN), **options)


def test_bad_token_in_the_source_raises_and_closes_the_session(guard):
    watch = guard.watch(iter([10, -3]))
    with pytest.raises(ValueError, match="-3"):
        list(watch)
    assert watch.result.state.closed


def test_split_prompt():
    assert split_prompt_ids([1, IM_END, 2, IM_END, 3, 4], IM_END) == ([1, IM_END, 2, IM_END],
                                                                      [3, 4])
    assert split_prompt_ids([1, 2], IM_END) == ([1, 2], [])
    assert split_prompt_ids([1, IM_END, 2], None) == ([1, IM_END, 2], [])


def test_a_raising_callback_keeps_the_watch_in_step(guard):
    """A token callback that raises after its token was scored: the token counts as scored
    (released), it is not lost nor fed again."""
    from qguard_stream import Hooks

    hooks = Hooks(errors="raise")
    calls = []

    def boom(event):
        calls.append(event)
        raise RuntimeError("callback failed")

    hooks.on_token(boom)
    state = guard.open_stream()
    watch = guard.watch(iter(CLEAN), prompt=PROMPT, state=state, hooks=hooks)
    with pytest.raises(RuntimeError, match="callback failed"):
        list(watch)
    assert len(calls) == 1
    assert state.token_ids == PROMPT + CLEAN[:1]
    assert watch.result.released == CLEAN[:1]
    guard.close_stream(state)


def test_flagged_error_is_exported_at_the_top_level():
    import qguard_stream

    assert qguard_stream.FlaggedError is FlaggedError and "FlaggedError" in qguard_stream.__all__
