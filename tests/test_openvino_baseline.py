"""The OpenVINO latency baseline (benchmarks/openvino_baseline.py): the backbone written for export
equals transformers' Qwen3Model, fed whole or in two chunks through its explicit past K/V; where the
`openvino` package is importable (it is never a dependency), the stateful export equals it too, its
rollback trims the states, and the fp32 variant keeps an f32 KV cache in the fused attention."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.baselines import load_hf_backbone
from benchmarks.openvino_baseline import ExportBackbone, read_backbone_tensors
from qguard_stream.checkpoints import make_random_checkpoint
from qguard_stream.stream import StreamGuard


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = make_random_checkpoint(tmp_path_factory.mktemp("ov") / "tiny", "tiny", seed=3)
    guard = StreamGuard.from_pretrained(directory)
    return directory, guard


@torch.no_grad()
def test_export_backbone_equals_transformers_whole_and_chunked(checkpoint):
    directory, guard = checkpoint
    reference = load_hf_backbone(directory, guard.config, torch.device("cpu"), torch.float32)
    backbone = ExportBackbone(read_backbone_tensors(directory), guard.config)
    ids = torch.randint(0, 5000, (1, 37), generator=torch.Generator().manual_seed(0))
    expected = reference(input_ids=ids).last_hidden_state
    whole = backbone(ids, torch.ones(1, 37), torch.arange(37)[None], *backbone.empty_past())
    torch.testing.assert_close(whole[0], expected, rtol=1e-4, atol=1e-4)
    first = backbone(ids[:, :25], torch.ones(1, 25), torch.arange(25)[None],
                     *backbone.empty_past())
    assert first[1].shape == (1, guard.config.num_key_value_heads, 25, guard.config.head_dim)
    second = backbone(ids[:, 25:], torch.ones(1, 37), torch.arange(25, 37)[None], *first[1:])
    torch.testing.assert_close(second[0], expected[:, 25:], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="the openvino package is not installed (optional: pip install openvino)")
def test_stateful_openvino_model_equals_the_backbone_and_rolls_back(checkpoint):
    from benchmarks.openvino_baseline import openvino_runners

    directory, guard = checkpoint
    backbone = ExportBackbone(read_backbone_tensors(directory), guard.config)
    ids = torch.randint(0, 5000, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = backbone(ids[None], torch.ones(1, 40), torch.arange(40)[None],
                            *backbone.empty_past())[0][0]
    fp32, default = openvino_runners(directory, guard.config, guard.model.response, threads=1)
    assert fp32.properties["KV_CACHE_PRECISION"] == "f32"
    runtime_ops = {op.get_rt_info()["layerType"].astype(str)
                   for op in fp32.compiled.get_runtime_model().get_ops()}
    assert "ScaledDotProductAttention" in runtime_ops  # the fused stateful attention
    for runner, tolerance in ((fp32, 1e-4), (default, 0.1)):  # default: a u8/f16 KV cache
        runner.reset(ids[:30])
        torch.testing.assert_close(runner.hidden(ids[30:]), expected[30:], rtol=tolerance,
                                   atol=tolerance)
        runner.rollback(33)  # keep 33 tokens: the next call sees positions 33..
        torch.testing.assert_close(runner.hidden(ids[33:]), expected[33:], rtol=tolerance,
                                   atol=tolerance)
    risk, category = fp32.step(ids[:2])
    assert risk.shape == (2, len(guard.config.response_risk_levels))
    assert category.shape[0] == 2
