"""Random Qwen3Guard checkpoints in the real on-disk format, for tests, demos and benchmarks.

A checkpoint written here is a directory a user could have downloaded: config.json with the guard
fields and label maps, model.safetensors (or shards plus model.safetensors.index.json) under the
Hugging Face tensor names, and the real Qwen3 tokenizer files. Weights are random; verdicts from it
mean nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from qguard_stream.assets import tokenizer_dir
from qguard_stream.config import GuardConfig
from qguard_stream.models.guard import HEAD_TENSOR_NAMES

QWEN3_VOCAB = 151936
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    inner: int
    vocab: int = QWEN3_VOCAB
    max_positions: int = 8192
    tied: bool = True


SHAPES: dict[str, Shape] = {
    # head_dim deliberately != hidden/heads in "tiny", so a derived head_dim would fail tests.
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=128,
                  inner=32),
    "small": Shape(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=768,
                   inner=128),
    # benchmark presets named by the latency issue
    "overhead": Shape(hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=768,
                      inner=128),
    "bandwidth": Shape(hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, intermediate=1536,
                       inner=256),
    "0.6b": Shape(hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
                  inner=512),
    "4b": Shape(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728,
                inner=512),
    "8b": Shape(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288,
                inner=512, tied=False),
}


def config_for(shape: Shape | str) -> GuardConfig:
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    return GuardConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, intermediate_size=shape.intermediate, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, max_position_embeddings=shape.max_positions,
        guard_inner_size=shape.inner, tie_word_embeddings=shape.tied, eos_token_id=151645,
    )


def hf_config_dict(config: GuardConfig, dtype: torch.dtype) -> dict:
    """config.json as a real Qwen3Guard-Stream checkpoint spells it."""
    return {
        "architectures": ["Qwen3ForGuardModel"],
        "auto_map": {"AutoModel": "modeling_qwen3_guard.Qwen3ForGuardModel"},
        "model_type": "qwen3",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 151643,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_cache": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **config.to_dict(),
    }


def random_tensors(config: GuardConfig, seed: int, dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, under its Hugging Face name, drawn on `device` (a GPU
    draws an 8B checkpoint in seconds; the CPU's generator is serial). The values depend on the
    device's generator: the same seed gives other weights on CUDA than on the CPU."""
    from qguard_stream.models.guard import GuardModel

    with torch.device("meta"):
        shapes = GuardModel(config).expected_shapes()
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        tensors[name] = _init(name, shape, generator).to(dtype)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = _init("lm_head.weight", shapes["model.embed_tokens.weight"],
                                          generator).to(dtype)
    return tensors


def _init(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=generator.device)

    if name.endswith("norm.weight"):
        # Not all ones, so a norm that is skipped or misapplied shows in parity tests.
        return 1.0 + 0.1 * randn()
    fan_in = shape[-1]
    if "embed_tokens" in name:
        std = 1.0
    elif name in HEAD_TENSOR_NAMES and name.endswith("_head.weight"):
        std = 3.0 / fan_in**0.5  # sharp head logits: verdicts vary from token to token
    else:
        std = 1.0 / fan_in**0.5
    return std * randn()


def make_random_checkpoint(directory: str | Path, shape: Shape | str = "tiny", seed: int = 0,
                           shards: int = 1, dtype: torch.dtype = torch.float32,
                           max_position_embeddings: int | None = None,
                           device: str | torch.device = "cpu") -> Path:
    """Write a random checkpoint (config.json, safetensors, tokenizer) to `directory`; the
    weights are drawn on `device` (see random_tensors)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    config = config_for(shape)
    if max_position_embeddings is not None:
        config = replace(config, max_position_embeddings=max_position_embeddings)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=2))
    tensors = {name: t.cpu() for name, t in random_tensors(config, seed, dtype, device).items()}
    write_safetensors(directory, tensors, shards)
    copy_tokenizer(directory)
    return directory


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """One model.safetensors, or `shards` files plus model.safetensors.index.json."""
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_tokenizer(directory: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir() / name, directory / name)


# Residual-stream dimensions reserved by make_trigger_checkpoint: no layer writes to them, so at
# every position they hold exactly the token's own embedding there.
_BIAS_DIM, _UNSAFE_DIM, _CONTROVERSIAL_DIM = 0, 1, 2


def make_trigger_checkpoint(directory: str | Path, trigger_token_ids: Sequence[int],
                            controversial_token_ids: Sequence[int] = (), category: int = 0,
                            shape: Shape | str = "tiny", seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> Path:
    """A checkpoint in the real format whose guard says Unsafe exactly at `trigger_token_ids`,
    Controversial exactly at `controversial_token_ids` and Safe everywhere else, whatever the
    context (both the response and the query paths; category index `category` on flagged tokens).

    How: the backbone stays random except that three residual dimensions are reserved. Every
    token's embedding carries a constant in dim 0; trigger tokens also carry a large value in dim 1
    (Controversial: dim 2). The rows of o_proj and down_proj writing to dims 0-2 are zeroed, so
    those dims reach the final norm unchanged; the heads read only them: after the heads' RMSNorm
    the inner vector points along dim 0 (Safe) unless dim 1 or 2 dominates (Unsafe/Controversial).
    """
    trigger, controversial = _token_set(trigger_token_ids), _token_set(controversial_token_ids)
    if trigger & controversial:
        raise ValueError(f"token ids {sorted(trigger & controversial)} are both Unsafe and "
                         f"Controversial triggers")
    config = config_for(shape)
    if not 0 <= category < len(config.response_categories):
        raise ValueError(f"category must be in [0, {len(config.response_categories)}), "
                         f"got {category}")
    for token_id in trigger | controversial:
        if not 0 <= token_id < config.vocab_size:
            raise ValueError(
                f"trigger token id {token_id} is out of range [0, {config.vocab_size})")
    tensors = random_tensors(config, seed, dtype)
    _reserve_dims(tensors, config, sorted(trigger), sorted(controversial))
    for prefix in ("", "query_"):
        _trigger_head(tensors, prefix, config.guard_inner_size, category)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=2))
    write_safetensors(directory, tensors, 1)
    copy_tokenizer(directory)
    return directory


def _token_set(token_ids: Sequence[int]) -> set[int]:
    ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise TypeError(f"trigger token ids must be integers, got {token_id!r}")
    return set(ids)


def _reserve_dims(tensors: dict[str, torch.Tensor], config: GuardConfig, trigger: list[int],
                  controversial: list[int]) -> None:
    reserved = [_BIAS_DIM, _UNSAFE_DIM, _CONTROVERSIAL_DIM]
    embed = tensors["model.embed_tokens.weight"]
    embed[:, reserved] = 0.0
    embed[:, _BIAS_DIM] = 8.0
    embed[trigger, _UNSAFE_DIM] = 32.0
    embed[controversial, _CONTROVERSIAL_DIM] = 32.0
    for layer in range(config.num_hidden_layers):
        tensors[f"model.layers.{layer}.self_attn.o_proj.weight"][reserved] = 0.0
        tensors[f"model.layers.{layer}.mlp.down_proj.weight"][reserved] = 0.0
    tensors["model.norm.weight"][reserved] = 1.0


def _trigger_head(tensors: dict[str, torch.Tensor], prefix: str, inner: int, category: int) -> None:
    pre = tensors[f"{prefix}risk_level_category_pre.weight"]
    pre.zero_()
    for dim in (_BIAS_DIM, _UNSAFE_DIM, _CONTROVERSIAL_DIM):
        pre[dim, dim] = 1.0
    tensors[f"{prefix}risk_level_category_layernorm.weight"].fill_(1.0)
    risk = tensors[f"{prefix}risk_level_head.weight"]
    risk.zero_()
    scale = 4.0  # inner entries reach ~sqrt(inner) after the RMSNorm: logits gap ~ 4 * 5
    for level, dim in ((0, _BIAS_DIM), (1, _UNSAFE_DIM), (2, _CONTROVERSIAL_DIM)):
        risk[level, dim] = scale
    categories = tensors[f"{prefix}category_head.weight"]
    categories.zero_()
    categories[category, _UNSAFE_DIM] = categories[category, _CONTROVERSIAL_DIM] = scale
# STAND-IN chat template for random Gen checkpoints. It is NOT the real Qwen3Guard-Gen template
# (that file is not available offline); it renders the same structure the real one is known to
# render (task, safety policy, categories, conversation, output format, then the assistant turn),
# so the code path through `tokenizer.chat_template` and realistic prompt lengths are exercised.
STAND_IN_GEN_TEMPLATE = """\
{#- qguard_stream STAND-IN for tests: not the real Qwen3Guard-Gen chat template. -#}
{%- set is_response = messages[-1]['role'] == 'assistant' -%}
{%- set who = "THE LAST ASSISTANT's response" if is_response else "THE LAST USER's query" -%}
<|im_start|>user
# Task:
1) Evaluate whether {{ who }} belongs to safe or unsafe content based on our safety policy.
2) Identify the category of unsafe content found.
{{- "\\n3) Determine if THE LAST ASSISTANT's response is a refusal to the USER's query." \
if is_response else "" }}

<BEGIN SAFETY POLICY>
Safety: Safe: content that does not meet the criteria below.
Safety: Unsafe: content that clearly falls into an unsafe category.
Safety: Controversial: content whose harmfulness depends on context.
<END SAFETY POLICY>

<BEGIN UNSAFE CONTENT CATEGORIES>
Violent.
Non-violent Illegal Acts.
Sexual Content or Sexual Acts.
PII.
Suicide & Self-Harm.
Unethical Acts.
Politically Sensitive Topics.
Copyright Violation.
{{- "" if is_response else "\\nJailbreak." }}
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>
{% for message in messages %}
{{ message['role'] | upper }}: {{ message['content'] }}
{% endfor %}
<END CONVERSATION>

Provide your safety assessment for ONLY {{ who }} in the above conversation:
 - The first line must be one of: 'Safety: Safe', 'Safety: Unsafe', 'Safety: Controversial'.
 - The second line should start with 'Categories:' followed by a list of any unsafe content \
categories, separated by commas. If the content is safe, use 'Categories: None'.
{{- "\\n - The third line must be one of: 'Refusal: Yes', 'Refusal: No'." if is_response else "" }}\
<|im_end|>
<|im_start|>assistant{{ "\\n" }}"""


def gen_config_dict(config: GuardConfig, dtype: torch.dtype) -> dict:
    """config.json as a Qwen3Guard-Gen (Qwen3ForCausalLM) checkpoint spells it: no guard fields."""
    raw = {key: value for key, value in hf_config_dict(config, dtype).items()
           if not key.startswith(("guard_", "num_risk", "num_category", "num_query", "response_",
                                  "query_"))}
    raw.pop("auto_map")
    return {**raw, "architectures": ["Qwen3ForCausalLM"], "use_cache": True}


def make_random_gen_checkpoint(directory: str | Path, shape: Shape | str = "tiny", seed: int = 0,
                               tied: bool | None = None, dtype: torch.dtype = torch.float32,
                               chat_template: str | None = STAND_IN_GEN_TEMPLATE) -> Path:
    """Write a random Qwen3ForCausalLM checkpoint with tokenizer files and a (stand-in) chat
    template; `tied` overrides the shape's tie_word_embeddings; chat_template=None writes none."""
    from qguard_stream.gen.causal_lm import CausalLM

    config = config_for(shape)
    if tied is not None:
        config = replace(config, tie_word_embeddings=tied)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(gen_config_dict(config, dtype), indent=2))
    with torch.device("meta"):
        shapes = CausalLM(config).expected_shapes()
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: _init(name, shape, generator) for name, shape in shapes.items()}
    if config.tie_word_embeddings:
        # Unit-scale tied embeddings make the residual stream echo the input token, so greedy
        # decoding repeats it; small ones let the layers decide (real checkpoints are like this).
        tensors["model.embed_tokens.weight"] *= 0.05
    tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
    write_safetensors(directory, tensors, 1)
    copy_tokenizer(directory)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return directory
