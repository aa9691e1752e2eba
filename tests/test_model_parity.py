"""Backbone and heads against independent references: transformers' Qwen3Model, plain formulas."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Model

from qguard_stream import StreamGuard
from qguard_stream.kvcache.paged import BlockPool, BlockTable, LayerView

SEQ = 200


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> Qwen3Model:
    return Qwen3Model.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 151936, (SEQ,), generator=torch.Generator().manual_seed(7))


def paged_views(guard: StreamGuard, length: int, block: int = 16) -> list[LayerView]:
    """The reference model's per-layer views of one session in a fresh pool (its blocks taken
    after another session's, so its slots are not simply 0..length)."""
    pool = BlockPool(guard.config, -(-length // block) + 1, block, guard.device, guard.dtype)
    BlockTable(block).grow(pool, 1)
    table = BlockTable(block)
    table.grow(pool, length)
    return [LayerView(pool, layer, table) for layer in range(guard.config.num_hidden_layers)]


def our_hidden(guard: StreamGuard, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return guard.model.model(ids, paged_views(guard, len(ids)), 0)


def test_hidden_states_match_transformers_qwen3(tiny_guard, reference, ids):
    with torch.inference_mode():
        expected = reference(ids[None]).last_hidden_state[0]
    assert (our_hidden(tiny_guard, ids) - expected).abs().max().item() <= 1e-4


def test_hidden_states_match_transformers_when_fed_in_chunks(tiny_guard, reference, ids):
    with torch.inference_mode():
        expected = reference(ids[None]).last_hidden_state[0]
    views = paged_views(tiny_guard, SEQ)
    parts = []
    with torch.inference_mode():
        for start in range(0, SEQ, 37):
            chunk = ids[start : start + 37]
            parts.append(tiny_guard.model.model(chunk, views, start))
    assert (torch.cat(parts) - expected).abs().max().item() <= 1e-4


def plain_head(hidden: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str, eps: float):
    """projection -> RMSNorm -> linear -> softmax, written from the formulas in float64."""
    h = hidden.double() @ tensors[f"{prefix}risk_level_category_pre.weight"].double().T
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h * tensors[f"{prefix}risk_level_category_layernorm.weight"].double()
    risk = torch.softmax(h @ tensors[f"{prefix}risk_level_head.weight"].double().T, -1)
    category = torch.softmax(h @ tensors[f"{prefix}category_head.weight"].double().T, -1)
    return risk, category


@pytest.mark.parametrize(
    ("role", "prefix", "categories"), [("assistant", "", 8), ("user", "query_", 9)]
)
def test_head_probabilities_equal_plain_formula(
    tiny_guard, tiny_checkpoint, ids, role, prefix, categories
):
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    hidden = our_hidden(tiny_guard, ids)
    risk_ref, cat_ref = plain_head(hidden, tensors, prefix, tiny_guard.config.rms_norm_eps)
    state = tiny_guard.open_stream()
    verdicts = tiny_guard.moderate(state, ids, role)
    tiny_guard.close_stream(state)
    assert verdicts.category_probs.shape == (SEQ, categories)
    assert (verdicts.risk_probs.double() - risk_ref).abs().max().item() <= 1e-5
    assert (verdicts.category_probs.double() - cat_ref).abs().max().item() <= 1e-5
    # the verdicts vary, so the comparison above is not between constants
    assert len(set(verdicts.risk_level)) > 1
