"""The two baselines the latency benchmark compares against, built on transformers' Qwen3Model.

- CardLoop: the model card's shipped streaming loop, re-implemented faithfully in its cost: every
  call re-runs the whole accumulated sequence through the backbone (no KV cache) and reads the
  guard heads at the new positions (REFERENCE.md: "Its shipped loop re-runs the whole accumulated
  sequence on every call").
- CachedTransformers: the best a transformers user gets: Qwen3Model with a DynamicCache, fed only
  the new tokens each call.
Both read the checkpoint's backbone tensors straight from its safetensors (independently of our
loader) and use the guard heads of the StreamGuard being measured, so the heads cost the same in
every variant. Nothing here is used by the runtime.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import DynamicCache, Qwen3Config, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from qguard_stream.config import GuardConfig
from qguard_stream.models.guard import GuardHead


def hf_config(config: GuardConfig, dtype: torch.dtype) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings, dtype=dtype,
        attn_implementation="sdpa",
    )


def load_hf_backbone(directory: Path, config: GuardConfig, device: torch.device,
                     dtype: torch.dtype) -> Qwen3Model:
    """transformers' Qwen3Model holding the checkpoint's `model.*` tensors."""
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith("model."):
                    state[name] = handle.get_tensor(name)
    return hf_backbone_from_tensors(state, config, device, dtype)


def hf_backbone_from_tensors(tensors: dict[str, torch.Tensor], config: GuardConfig,
                             device: torch.device, dtype: torch.dtype) -> Qwen3Model:
    """transformers' Qwen3Model holding the `model.*` tensors of a checkpoint's tensor dict
    (shared, not copied, when already on `device` in `dtype`)."""
    hf = hf_config(config, dtype)
    with torch.device("meta"):
        model = Qwen3Model(hf)
    state = {name.removeprefix("model."): tensor.to(device, dtype)
             for name, tensor in tensors.items() if name.startswith("model.")}
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary_emb = Qwen3RotaryEmbedding(hf).to(device)
    return model.eval()


class CardLoop:
    """(b) The card's loop: each call re-runs the whole sequence so far."""

    name = "card_loop"

    def __init__(self, backbone: Qwen3Model, head: GuardHead) -> None:
        self.backbone, self.head = backbone, head
        self.token_ids = torch.empty(0, dtype=torch.int64)

    def reset(self, prompt_ids: torch.Tensor) -> None:
        self.token_ids = prompt_ids.clone()

    @torch.inference_mode()
    def step(self, new_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.token_ids = torch.cat((self.token_ids, new_ids))
        device = self.backbone.embed_tokens.weight.device
        out = self.backbone(input_ids=self.token_ids.to(device)[None], use_cache=False)
        return self.head(out.last_hidden_state[0, -new_ids.shape[0]:])

    def rollback(self, length: int) -> None:
        self.token_ids = self.token_ids[:length]


class CachedTransformers:
    """(c) Qwen3Model with a DynamicCache, fed only the new tokens."""

    name = "hf_dynamic_cache"

    def __init__(self, backbone: Qwen3Model, head: GuardHead) -> None:
        self.backbone, self.head = backbone, head
        self.cache = DynamicCache(config=backbone.config)

    @torch.inference_mode()
    def reset(self, prompt_ids: torch.Tensor) -> None:
        self.cache = DynamicCache(config=self.backbone.config)
        self.step(prompt_ids)

    @torch.inference_mode()
    def step(self, new_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.backbone.embed_tokens.weight.device
        out = self.backbone(input_ids=new_ids.to(device)[None], past_key_values=self.cache,
                            use_cache=True)
        return self.head(out.last_hidden_state[0])

    def rollback(self, length: int) -> None:
        # transformers 5.x crops by a negative count of tokens to drop (4.x: by the new length).
        removed = self.cache.get_seq_length() - length
        if removed:
            self.cache.crop(-removed)
