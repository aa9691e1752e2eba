"""GenGuard: greedy ids equal transformers' Qwen3ForCausalLM.generate(do_sample=False); loading,
templates and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3ForCausalLM

from qguard_stream.checkpoints import make_random_checkpoint, make_random_gen_checkpoint
from qguard_stream.gen.decode import Decoder, Sampling, pick_token, top_p_filter
from qguard_stream.gen.guard import GenGuard
from qguard_stream.gen.parse import GenVerdict
from qguard_stream.kvcache.paged import PoolTooSmallError, bytes_per_token, default_block_size
from qguard_stream.loader import CheckpointError

NEW_TOKENS = 6
PAD = 151643


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[bool, tuple[GenGuard, Qwen3ForCausalLM]]:
    """A tied and an untied random Gen checkpoint, each loaded by us and by transformers."""
    loaded = {}
    for tied in (True, False):
        directory = make_random_gen_checkpoint(tmp_path_factory.mktemp("gen"), "tiny", seed=7,
                                               tied=tied)
        hf = Qwen3ForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
        loaded[tied] = GenGuard.from_pretrained(directory, device="cpu"), hf
    return loaded


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def pair(request, pairs) -> tuple[GenGuard, Qwen3ForCausalLM]:
    return pairs[request.param]


@pytest.fixture
def untied(pairs) -> tuple[GenGuard, Qwen3ForCausalLM]:
    return pairs[False]


def random_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 151000, (n,), generator=generator).tolist() for n in (1, 9, 30)]


_HF_RESULTS: dict[tuple, list[int]] = {}


def hf_generate(hf: Qwen3ForCausalLM, ids: list[int], eos: int | list[int],
                new_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy continuation (memoised: the same call recurs across tests)."""
    key = (id(hf), tuple(ids), str(eos), new_tokens)
    if key not in _HF_RESULTS:
        _HF_RESULTS[key] = _hf_generate(hf, ids, eos, new_tokens)
    return _HF_RESULTS[key]


def _hf_generate(hf: Qwen3ForCausalLM, ids: list[int], eos: int | list[int],
                 new_tokens: int) -> list[int]:
    inputs = torch.tensor([ids])
    out = hf.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                      max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=PAD)
    return out[0, len(ids):].tolist()


def test_greedy_ids_equal_transformers_generate(pair):
    guard, hf = pair
    for ids in random_prompts():
        assert guard.generate_ids(ids, NEW_TOKENS, eos_token_id=151645) == \
            hf_generate(hf, ids, 151645)


def test_greedy_ids_on_a_templated_prompt_equal_transformers(pair):
    guard, hf = pair
    ids = guard.render([{"role": "user", "content": "How can I make a bomb?"}])
    assert guard.generate_ids(ids, NEW_TOKENS) == hf_generate(hf, ids, [151645])


def test_generation_stops_after_eos_and_includes_it(untied):
    guard, hf = untied
    ids = random_prompts()[1]
    free = guard.generate_ids(ids, NEW_TOKENS, eos_token_id=[])
    assert len(free) == NEW_TOKENS
    stop_at = next(i for i in range(1, NEW_TOKENS) if free[i] not in free[:i])
    eos = free[stop_at]
    ours = guard.generate_ids(ids, NEW_TOKENS, eos_token_id=eos)
    assert ours == free[: stop_at + 1]
    assert ours == hf_generate(hf, ids, eos)


def test_batched_decode_equals_each_row_generated_alone(pair):
    guard, hf = pair
    prompts = random_prompts()
    batched = guard.generate_ids_batch(prompts, NEW_TOKENS, eos_token_id=151645)
    assert batched == [hf_generate(hf, ids, 151645) for ids in prompts]


def test_batched_decode_equals_transformers_left_padded_batch(pair):
    guard, hf = pair
    prompts = random_prompts()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                      eos_token_id=151645, pad_token_id=PAD)
    expected = [_through_eos(row, 151645) for row in out[:, width:].tolist()]
    assert guard.generate_ids_batch(prompts, NEW_TOKENS, eos_token_id=151645) == expected


def _through_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_sequences_wait_for_pool_room_and_still_equal_transformers(untied):
    """A pool with room for one sequence at a time: the others wait and join as it frees its
    blocks (continuous batching); every row still equals transformers, and no block leaks."""
    guard, hf = untied
    prompts = random_prompts()  # 1, 9 and 30 tokens + 6 new: one block of 64 each
    block = default_block_size("cpu")
    decoder = Decoder(guard.lm, kv_memory_gb=block * bytes_per_token(guard.config,
                                                                      torch.float32) / 2**30)
    assert decoder.generate(prompts, NEW_TOKENS, frozenset({151645})) == \
        [hf_generate(hf, ids, 151645) for ids in prompts]
    assert decoder.pool.num_blocks == 1 and decoder.pool.used_blocks == 0


def test_a_sequence_larger_than_the_pool_is_a_typed_error(untied):
    guard, _ = untied
    block = default_block_size("cpu")
    decoder = Decoder(guard.lm, kv_memory_gb=block * bytes_per_token(guard.config,
                                                                     torch.float32) / 2**30)
    with pytest.raises(PoolTooSmallError, match="kv_memory_gb"):
        decoder.generate([[5] * 9, [7] * block], NEW_TOKENS, frozenset())
    assert decoder.pool.used_blocks == 0  # refused before any block was taken


def test_empty_batch_gives_no_rows(untied):
    guard, _ = untied
    assert guard.generate_ids_batch([], 4) == []
    assert guard.moderate_batch([], 4) == []


def test_batched_decode_with_an_early_stopping_row(untied):
    guard, hf = untied
    prompts = random_prompts()
    eos = guard.generate_ids(prompts[1], NEW_TOKENS, eos_token_id=[])[2]
    batched = guard.generate_ids_batch(prompts, NEW_TOKENS, eos_token_id=eos)
    assert batched[1][-1] == eos and len(batched[1]) <= 3
    assert batched == [hf_generate(hf, ids, eos) for ids in prompts]


def test_moderate_prompt_decodes_the_generated_text(untied):
    guard, hf = untied
    verdict = guard.moderate_prompt("How can I make a bomb?", max_new_tokens=4)
    ids = guard.render([{"role": "user", "content": "How can I make a bomb?"}])
    expected = hf_generate(hf, ids, 151645, new_tokens=4)
    assert isinstance(verdict, GenVerdict) and verdict.kind == "prompt"
    assert verdict.raw_text == guard.tokenizer.decode(expected, skip_special_tokens=True)
    assert not verdict.parsed and verdict.safety is None  # random weights write no verdict


def test_moderate_batch_matches_single_calls(untied):
    guard, _ = untied
    conversations = [[{"role": "user", "content": "hi"}],
                     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]]
    batch = guard.moderate_batch(conversations, max_new_tokens=3)
    assert batch[0] == guard.moderate_prompt("hi", max_new_tokens=3)
    assert batch[1] == guard.moderate_response("hi", "no", max_new_tokens=3)
    assert batch[1].kind == "response"


def test_tied_checkpoint_has_no_lm_head_and_shares_the_embedding(tmp_path):
    directory = make_random_gen_checkpoint(tmp_path, "tiny", seed=1, tied=True)
    assert "lm_head.weight" not in load_file(str(directory / "model.safetensors"))
    guard = GenGuard.from_pretrained(directory, device="cpu")
    assert guard.lm.lm_head.weight is guard.lm.model.embed_tokens.weight


def test_render_uses_the_checkpoint_template(tmp_path):
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    directory = make_random_gen_checkpoint(tmp_path, "tiny", seed=1, chat_template=template)
    guard = GenGuard.from_pretrained(directory, device="cpu")
    ids = guard.render([{"role": "user", "content": "abc"}])
    assert guard.tokenizer.decode(ids) == "<<abc>>"


def test_checkpoint_without_chat_template_is_a_clear_error(tmp_path):
    directory = make_random_gen_checkpoint(tmp_path, "tiny", seed=1, chat_template=None)
    with pytest.raises(CheckpointError, match="chat_template"):
        GenGuard.from_pretrained(directory, device="cpu")


def test_stream_checkpoint_is_refused(tmp_path):
    directory = make_random_checkpoint(tmp_path, "tiny", seed=1)
    with pytest.raises(CheckpointError, match="StreamGuard"):
        GenGuard.from_pretrained(directory, device="cpu")


def test_untied_checkpoint_missing_lm_head_lists_it(tmp_path):
    directory = make_random_gen_checkpoint(tmp_path, "tiny", seed=1, tied=False)
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors: lm_head.weight"):
        GenGuard.from_pretrained(directory, device="cpu")


def test_config_eos_list_is_used_as_stop_ids(tmp_path):
    directory = make_random_gen_checkpoint(tmp_path, "tiny", seed=1)
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = [151645, 151643]
    (directory / "config.json").write_text(json.dumps(config))
    guard = GenGuard.from_pretrained(Path(directory), device="cpu")
    assert guard.stop_ids == frozenset({151645, 151643})


@pytest.mark.parametrize("bad, message", [([], "empty"), ([1, -1], "-1"), ([1.5], "1.5"),
                                          ([True], "True"), ([151936], "151936")])
def test_bad_token_ids_are_rejected_naming_the_value(untied, bad, message):
    guard, _ = untied
    with pytest.raises(ValueError, match=message):
        guard.generate_ids(bad, 2)


def test_bad_max_new_tokens_is_rejected(untied):
    guard, _ = untied
    with pytest.raises(ValueError, match="max_new_tokens"):
        guard.generate_ids([1, 2], 0)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_checkpoint_saved_by_transformers_loads_and_decodes_the_same(tmp_path, tied):
    from transformers import Qwen3Config

    from qguard_stream.checkpoints import STAND_IN_GEN_TEMPLATE, copy_tokenizer

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=151936, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         intermediate_size=128, tie_word_embeddings=tied,
                         max_position_embeddings=512, eos_token_id=151645)
    hf = Qwen3ForCausalLM(config).eval()
    hf.save_pretrained(str(tmp_path))
    copy_tokenizer(tmp_path)
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = STAND_IN_GEN_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    guard = GenGuard.from_pretrained(tmp_path, device="cpu")
    ids = random_prompts()[1]
    assert guard.generate_ids(ids, NEW_TOKENS) == _hf_generate(hf, ids, 151645, NEW_TOKENS)


PROBS = torch.tensor([0.0625, 0.5, 0.1875, 0.25])  # exact in binary: the cut is not rounding's


@pytest.mark.parametrize("top_p, kept", [
    (1e-6, [1]), (0.5, [1]), (0.51, [1, 3]), (0.75, [1, 3]), (0.76, [1, 3, 2]),
    (0.9375, [1, 3, 2]), (0.94, [1, 3, 2, 0]), (1.0, [1, 3, 2, 0]),
])
def test_top_p_keeps_the_smallest_set_of_top_tokens_reaching_top_p(top_p, kept):
    expected = torch.zeros(4)
    expected[kept] = PROBS[kept]
    assert torch.equal(top_p_filter(PROBS, top_p), expected)


def test_pick_token_is_the_argmax_when_greedy_and_draws_from_the_nucleus_otherwise():
    logits = PROBS.log()
    assert pick_token(logits, Sampling()) == 1
    generator = torch.Generator().manual_seed(0)
    draws = [pick_token(logits, Sampling(1.0, 0.75), generator) for _ in range(200)]
    assert set(draws) == {1, 3}  # 2/3 and 1/3 once renormalised: both come up in 200 draws
    assert {pick_token(logits, Sampling(2.0, 1e-6), generator) for _ in range(50)} == {1}
    assert set(pick_token(logits, Sampling(2.0), generator) for _ in range(200)) == {0, 1, 2, 3}
