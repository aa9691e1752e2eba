"""Loading real-format checkpoints: shards, dtypes, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qguard_stream import CheckpointError, ConfigError, StreamGuard
from qguard_stream.checkpoints import make_random_checkpoint

IDS = torch.randint(0, 151936, (40,), generator=torch.Generator().manual_seed(11))


def probs(guard: StreamGuard, role: str = "assistant") -> torch.Tensor:
    state = guard.open_stream()
    out = guard.moderate(state, IDS, role).risk_probs.float()
    guard.close_stream(state)
    return out


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_sharded_load_equals_single_file(tiny_checkpoint, tiny_guard, tmp_path):
    sharded = make_random_checkpoint(tmp_path / "sharded", "tiny", seed=1, shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    assert (sharded / "model.safetensors.index.json").is_file()
    guard = StreamGuard.from_pretrained(sharded, device="cpu")
    assert torch.equal(probs(guard), probs(tiny_guard))
    assert torch.equal(probs(guard, "user"), probs(tiny_guard, "user"))


def test_bf16_load_is_close_to_fp32(tiny_checkpoint, tiny_guard):
    guard = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.bfloat16)
    assert guard.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert (probs(guard) - probs(tiny_guard)).abs().max().item() < 0.1


def test_default_dtype_is_fp32_on_cpu(tiny_guard):
    assert tiny_guard.dtype == torch.float32 and tiny_guard.device.type == "cpu"


def test_tokenizer_is_loaded_from_the_checkpoint(tiny_guard):
    assert tiny_guard.tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645


def test_lm_head_and_unknown_tensors_are_ignored(tiny_checkpoint, tiny_guard, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "extra")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = torch.zeros(3, 3)
    tensors["something.unknown"] = torch.zeros(2)
    save_file(tensors, str(path / "model.safetensors"))
    assert torch.equal(probs(StreamGuard.from_pretrained(path, device="cpu")), probs(tiny_guard))


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "missing")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["query_category_head.weight"], tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError,
        match="missing tensors: model.layers.1.mlp.up_proj.weight, query_category_head.weight",
    ):
        StreamGuard.from_pretrained(path, device="cpu")


def test_misshapen_tensor_is_named_with_shapes(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "misshapen")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["category_head.weight"] = torch.zeros(7, 32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"category_head.weight: expected \(8, 32\), got \(7, 32\)"
    ):
        StreamGuard.from_pretrained(path, device="cpu")


def test_truncated_safetensors_file_is_reported(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "truncated")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        StreamGuard.from_pretrained(path, device="cpu")


def test_missing_shard_named_by_index_is_reported(tmp_path):
    path = make_random_checkpoint(tmp_path / "shards", "tiny", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        StreamGuard.from_pretrained(path, device="cpu")


def test_missing_config_field_is_named(tiny_checkpoint, tmp_path):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "noconfig")
    config = json.loads((path / "config.json").read_text())
    del config["guard_inner_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="guard_inner_size"):
        StreamGuard.from_pretrained(path, device="cpu")


def test_non_existent_path_says_what_was_tried(tmp_path):
    with pytest.raises(CheckpointError, match="not an existing directory"):
        StreamGuard.from_pretrained(tmp_path / "nope", device="cpu")


@pytest.fixture
def hub_cache(monkeypatch, tmp_path) -> Path:
    """An empty local Hugging Face cache, with the hub unreachable (offline)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_unreachable_hub_id_says_what_was_tried(hub_cache):
    with pytest.raises(CheckpointError, match="Hugging Face Hub.*local Hugging Face cache"):
        StreamGuard.from_pretrained("nobody/no-such-guard", device="cpu")


def test_hub_id_resolves_from_local_cache_offline(tiny_checkpoint, tiny_guard, hub_cache):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--acme--guard"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    guard = StreamGuard.from_pretrained("acme/guard", device="cpu")
    assert torch.equal(probs(guard), probs(tiny_guard))


def test_a_model_from_tensors_equals_the_loaded_checkpoint(tmp_path) -> None:
    from qguard_stream.checkpoints import config_for, make_random_checkpoint, random_tensors
    from qguard_stream.loader import model_from_tensors

    path = make_random_checkpoint(tmp_path / "ckpt", "tiny", seed=3)
    loaded = StreamGuard.from_pretrained(path, device="cpu", fast_path=False).model
    config = config_for("tiny")
    built = model_from_tensors(config, random_tensors(config, 3, torch.float32),
                               torch.device("cpu"), torch.float32)
    loaded_state, built_state = loaded.state_dict(), built.state_dict()
    assert loaded_state.keys() == built_state.keys()
    for name, tensor in loaded_state.items():
        assert torch.equal(tensor, built_state[name]), name
    tensors = random_tensors(config, 3, torch.float32)
    del tensors["model.norm.weight"]
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        model_from_tensors(config, tensors, torch.device("cpu"), torch.float32)


def test_loading_and_scoring_import_neither_torch_compile_nor_the_server(
        tiny_checkpoint: Path) -> None:
    """A fresh process that loads a guard and scores a prompt and a token imports none of
    torch._dynamo and sympy (arithmetic on the meta device, where the loader builds the model,
    pulled them in: 2.5 s and 140 MB of RSS) nor the server's packages."""
    from fresh import last_line

    script = (
        "import sys\n"
        "from qguard_stream import StreamGuard\n"
        f"guard = StreamGuard.from_pretrained({str(tiny_checkpoint)!r}, device='cpu')\n"
        "state = guard.open_stream()\n"
        "guard.moderate(state, list(range(1, 40)), 'user')\n"
        "guard.moderate(state, [7], 'assistant')\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy', 'fastapi', 'uvicorn', 'websockets')"
        " if m in sys.modules))\n")
    assert last_line(script) == "[]"
