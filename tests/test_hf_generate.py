"""transformers generate() guarded by GuardStoppingCriteria: a small random Qwen3ForCausalLM
generates; an engineered guard checkpoint flags a chosen token pair; rows stop where the official
rule says, each row on its own session."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.generation.streamers import BaseStreamer

from qguard_stream import StreamGuard, consecutive_unsafe
from qguard_stream.checkpoints import make_trigger_checkpoint
from qguard_stream.integrations.hf_generate import (
    GuardStoppingCriteria,
    HoldbackStreamer,
    guard_criteria,
)

PAD, EOS, NEW = 0, 511, 16
PROMPTS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])


@dataclass
class Setup:
    lm: Qwen3ForCausalLM
    reference: torch.Tensor  # unguarded greedy output [2, 4 + NEW]
    triggers: tuple[int, int]
    expected_index: int  # flagged response index in row 0 (official rule)
    guard: StreamGuard


def generate(lm, prompts, **options) -> torch.Tensor:
    mask = options.pop("attention_mask", torch.ones_like(prompts))
    options.setdefault("eos_token_id", EOS)
    return lm.generate(prompts, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                       pad_token_id=PAD, **options)


def choose_triggers(reference: torch.Tensor) -> tuple[tuple[int, int], int]:
    """A pair of adjacent tokens of row 0 that row 1 never emits; the index the rule flags."""
    row0, row1 = reference[0, 4:].tolist(), reference[1, 4:].tolist()
    for k in range(2, len(row0) - 2):
        pair = (row0[k], row0[k + 1])
        if set(pair) & set(row1) or set(pair) & {PAD, EOS}:
            continue
        label, index = consecutive_unsafe(["Unsafe" if t in pair else "Safe" for t in row0])
        if label == "Unsafe" and 2 <= index < len(row0) - 2:
            return pair, index
    raise AssertionError(f"no usable trigger pair in {reference.tolist()}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=256, eos_token_id=EOS,
                         pad_token_id=PAD, bos_token_id=1)
    lm = Qwen3ForCausalLM(config).eval()
    reference = generate(lm, PROMPTS)
    assert reference.shape == (2, 4 + NEW)  # no early EOS in the unguarded run
    triggers, index = choose_triggers(reference)
    path = make_trigger_checkpoint(tmp_path_factory.mktemp("trigger"), triggers)
    return Setup(lm, reference, triggers, index, StreamGuard.from_pretrained(path, device="cpu"))


def test_batched_generate_stops_the_flagged_row_and_finishes_the_clean_one(setup):
    criteria_list, criteria = guard_criteria(setup.guard, pad_token_id=PAD, eos_token_id=EOS)
    with criteria:
        out = generate(setup.lm, PROMPTS, stopping_criteria=criteria_list)
        stop = 4 + setup.expected_index + 1
        assert out[0, :stop].tolist() == setup.reference[0, :stop].tolist()
        assert (out[0, stop:] == PAD).all()
        assert out[1].tolist() == setup.reference[1].tolist()
        decision = criteria.decision(0)
        assert (decision.label, decision.index) == ("Unsafe", setup.expected_index)
        assert decision.token_id == setup.reference[0, stop - 1].item()
        assert decision.position == stop - 1  # prompt positions come first in the session
        assert criteria.decision(1) is None and criteria.stopped == [True, False]
        assert criteria.sessions[0].token_ids == out[0, :stop].tolist()  # not fed after the stop
        assert criteria.sessions[1].token_ids == setup.reference[1].tolist()
    assert all(state.closed for state in criteria.sessions)


class Collect(BaseStreamer):
    """A streamer that records what generate() hands it."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


def test_streamer_sees_the_tokens_up_to_the_flag(setup):
    streamer = Collect()
    criteria = GuardStoppingCriteria(setup.guard, eos_token_id=EOS)
    out = generate(setup.lm, PROMPTS[:1], stopping_criteria=[criteria], streamer=streamer)
    criteria.close()
    stop = 4 + setup.expected_index + 1
    assert out[0].tolist() == setup.reference[0, :stop].tolist()
    assert streamer.puts[0] == PROMPTS[0].tolist() and streamer.ended
    assert [t for put in streamer.puts[1:] for t in put] == out[0, 4:].tolist()


def test_left_padded_prompts_are_fed_without_padding(setup):
    prompts = torch.tensor([[5, 6, 7, 8], [PAD, 10, 11, 12]])
    mask = (prompts != PAD).long()
    criteria = GuardStoppingCriteria(setup.guard, pad_token_id=PAD, eos_token_id=EOS)
    out = generate(setup.lm, prompts, attention_mask=mask, stopping_criteria=[criteria])
    stop = 4 + setup.expected_index + 1
    assert out[0, :stop].tolist() == setup.reference[0, :stop].tolist()
    assert criteria.sessions[1].token_ids[:3] == [10, 11, 12]
    assert criteria.sessions[1].token_ids[3:] == out[1, 4:].tolist()
    criteria.close()


def test_a_row_is_not_fed_after_its_eos(setup):
    row1 = setup.reference[1, 4:].tolist()
    k = next(i for i in range(2, NEW) if row1[i] not in row1[:i] and row1[i] not in setup.triggers)
    eos = row1[k]
    criteria = GuardStoppingCriteria(setup.guard, pad_token_id=PAD, eos_token_id=eos)
    out = generate(setup.lm, PROMPTS, eos_token_id=eos, stopping_criteria=[criteria])
    assert criteria.sessions[1].token_ids == setup.reference[1, : 4 + k + 1].tolist()
    assert (out[1, 4 + k + 1:] == PAD).all()
    criteria.close()


def test_one_criteria_per_generate_call(setup):
    criteria = GuardStoppingCriteria(setup.guard)
    criteria(setup.reference[:, :5], None)
    with pytest.raises(ValueError, match="rows"):
        criteria(setup.reference[:1, :6], None)
    criteria.close()


def test_bad_options_are_rejected(setup):
    with pytest.raises(TypeError, match="policy"):
        GuardStoppingCriteria(setup.guard, policy="loose")
    with pytest.raises(ValueError, match="prompt_length"):
        GuardStoppingCriteria(setup.guard, prompt_length=-1)


@pytest.mark.parametrize("holdback", [0, 2])
def test_holdback_streamer_withholds_the_flagged_span(setup, holdback):
    inner = Collect()
    criteria = GuardStoppingCriteria(setup.guard, eos_token_id=EOS)
    streamer = HoldbackStreamer(inner, criteria, holdback=holdback)
    generate(setup.lm, PROMPTS[:1], stopping_criteria=[criteria], streamer=streamer)
    criteria.close()
    flagged = 4 + setup.expected_index
    cut = max(4, flagged - holdback)
    released = [t for put in inner.puts[1:] for t in put]
    assert inner.puts[0] == PROMPTS[0].tolist() and inner.ended
    assert released == setup.reference[0, 4:cut].tolist()
    assert streamer.withheld == setup.reference[0, cut:flagged + 1].tolist()


def test_holdback_streamer_releases_everything_of_a_clean_row(setup):
    inner = Collect()
    criteria = GuardStoppingCriteria(setup.guard, eos_token_id=EOS)
    streamer = HoldbackStreamer(inner, criteria, holdback=2)
    out = generate(setup.lm, PROMPTS[1:], stopping_criteria=[criteria], streamer=streamer)
    criteria.close()
    assert [t for put in inner.puts[1:] for t in put] == out[0, 4:].tolist()
    assert streamer.withheld == []
