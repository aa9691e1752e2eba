"""Checkpoint loading: resolve a directory or hub id, read (sharded) safetensors into a GuardModel.

Tensors are memory-mapped from disk and moved straight to the target device and dtype, one at a
time, into a model built on the meta device, so peak host memory stays near one tensor. Every tensor
the guard needs is checked for presence and shape before anything is read. This module must not run
the model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from qguard_stream.config import GuardConfig
from qguard_stream.models.guard import GuardModel
from qguard_stream.models.qwen3 import Rotary

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.py"]


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read, or does not match its config."""


def resolve_checkpoint(path_or_id: str | os.PathLike[str]) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id, downloaded or from the local
    cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists():
        raise CheckpointError(f"checkpoint path {text!r} is a file; expected a directory")
    if _looks_like_path(text) or text.count("/") != 1:
        raise CheckpointError(
            f"checkpoint {text!r} not found: it is not an existing directory, nor a Hugging Face "
            "repo id of the form 'owner/name'"
        )
    return _from_hub(text)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in text)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    tried: list[str] = []
    for local_only in (False, True):
        try:
            return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS,
                                          local_files_only=local_only))
        except Exception as err:
            where = "the local Hugging Face cache" if local_only else "the Hugging Face Hub"
            tried.append(f"{where}: {type(err).__name__}: {err}".splitlines()[0])
    raise CheckpointError(
        f"checkpoint {repo_id!r} is not a local directory and could not be fetched; tried "
        + "; ".join(tried) + ". Offline, pass a checkpoint directory instead (one downloaded "
        f"elsewhere with `hf download {repo_id} --local-dir DIR`, or `huggingface-cli download` "
        "on huggingface_hub < 1.0); `qguard-stream demo` runs without one"
    )


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid shard index: {err!r}") from None
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    with _open(single) as handle:
        return {name: single for name in handle.keys()}


def _open(file: Path, device: str = "cpu"):
    if not file.is_file():
        raise CheckpointError(f"shard {file} named by the index does not exist")
    try:
        return safe_open(str(file), framework="pt", device=device)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"cannot read {file} (truncated or not safetensors?): {err}") from None


def check_tensors(directory: Path, files: dict[str, Path],
                  expected: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError listing every missing or misshapen tensor; log unknown extras."""
    missing = sorted(set(expected) - set(files))
    misshapen = []
    for file in sorted(set(files.values())):
        with _open(file) as handle:
            for name in handle.keys():
                if name in expected:
                    shape = tuple(handle.get_slice(name).get_shape())
                    if shape != expected[name]:
                        misshapen.append(f"{name}: expected {expected[name]}, got {shape}")
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if misshapen:
        problems.append(f"misshapen tensors: {'; '.join(misshapen)}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config: "
                              + " | ".join(problems))
    extras = sorted(set(files) - set(expected))
    if extras:
        log.debug("ignoring %d tensors the guard does not use: %s", len(extras), extras[:8])


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(directory: Path, config: GuardConfig, device: torch.device,
               dtype: torch.dtype, check_finite: bool = True) -> GuardModel:
    """Build a GuardModel on the meta device and fill it from the checkpoint in `directory`."""
    with torch.device("meta"):
        model = GuardModel(config)
    return fill_model(model, directory, device, dtype, check_finite)


def fill_model(model: nn.Module, directory: Path, device: torch.device,
               dtype: torch.dtype, check_finite: bool = True) -> nn.Module:
    """Fill a meta-device model from `directory`. The model provides `config`, `model` (the
    Backbone), `expected_shapes()` and `parameter_for(name)`; every expected tensor is checked
    for presence and shape, and (`check_finite`, default on; one pass over the weights) for
    NaN/Inf after the cast to `dtype`, which raises CheckpointError naming the tensor."""
    config = model.config
    expected = model.expected_shapes()
    files = weight_files(directory)
    check_tensors(directory, files, expected)
    shards = sorted({files[name] for name in expected})
    for file in tqdm(shards, desc="loading shards", unit="shard", disable=len(shards) < 2):
        names = [name for name in expected if files[name] == file]
        _assign(model, file, names, device, dtype, check_finite)
    model.model.rotary = Rotary(config.head_dim, config.rope_theta).to(device)
    return model.eval()


def model_from_tensors(config: GuardConfig, tensors: dict[str, torch.Tensor],
                       device: torch.device, dtype: torch.dtype) -> GuardModel:
    """A GuardModel holding `tensors` (checkpoint names -> tensors, e.g. drawn on the GPU by
    checkpoints.random_tensors), assigned as from_pretrained assigns a checkpoint's, with the
    same name and shape checks; tensors already on `device` in `dtype` are used, not copied."""
    with torch.device("meta"):
        model = GuardModel(config)
    expected = model.expected_shapes()
    missing = sorted(set(expected) - set(tensors))
    wrong = sorted(f"{name}: {tuple(tensors[name].shape)} != {shape}"
                   for name, shape in expected.items()
                   if name in tensors and tuple(tensors[name].shape) != shape)
    if missing or wrong:
        raise CheckpointError(f"tensors do not fit the config: missing {missing[:8]}, "
                              f"wrong shapes {wrong[:8]}")
    for name in expected:
        module, attr = model.parameter_for(name)
        value = tensors[name].to(device=device, dtype=dtype)
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
    model.model.rotary = Rotary(config.head_dim, config.rope_theta).to(device)
    return model.eval()


def _assign(model: nn.Module, file: Path, names: Iterable[str], device: torch.device,
            dtype: torch.dtype, check_finite: bool) -> None:
    # Read on the CPU (memory-mapped) and move once; safe_open's own device path would
    # materialise in the file's dtype on the device first.
    with _open(file) as handle:
        for name in names:
            try:
                tensor = handle.get_tensor(name)
            except SafetensorError as err:
                raise CheckpointError(f"cannot read tensor {name} from {file}: {err}") from None
            module, attr = model.parameter_for(name)
            value = tensor.to(device=device, dtype=dtype)
            if check_finite:
                check_finite_tensor(value, f"tensor {name} in {file}")
            setattr(module, attr, nn.Parameter(value, requires_grad=False))


def check_finite_tensor(value: torch.Tensor, what: str) -> None:
    """CheckpointError naming `what` if `value` holds NaN or Inf."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise CheckpointError(
            f"{what} has {bad} non-finite value(s) (NaN/Inf) in {value.dtype}: the model would "
            f"score garbage. Fix the checkpoint, or pass check_finite=False to skip this check")


def load_tokenizer(directory: Path):
    """The tokenizer stored beside the weights, or None when the directory has none."""
    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                    "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as error:  # tokenizers raises bare Exceptions for malformed files
        files = sorted(p.name for p in directory.iterdir()
                       if p.name.startswith(("tokenizer", "vocab", "merges", "special")))
        raise CheckpointError(f"cannot load the tokenizer in {directory} (files {files}): "
                              f"{type(error).__name__}: {error}") from None
