"""The Qwen3 causal LM behind Qwen3Guard-Gen (Backbone + lm_head) and greedy decoding on our KV
cache.

Loading reuses the guard's loader (same tensor names under `model.`, same checks); the LM head is
`lm_head.weight`, or the embedding matrix when the config ties them. Decoding is greedy only: the
Gen model is a classifier that writes its verdict, so sampling has no use here. This module knows
nothing of chat templates or verdict text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qguard_stream.config import GuardConfig
from qguard_stream.kvcache.session import SessionCache
from qguard_stream.models.qwen3 import Backbone


class CausalLM(nn.Module):
    """Qwen3ForCausalLM: the Backbone plus a vocabulary projection (tied or untied)."""

    def __init__(self, config: GuardConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor name -> shape; no lm_head.weight when tied (it is the embedding)."""
        shapes = {f"model.{name}": tuple(p.shape) for name, p in self.model.named_parameters()}
        if not self.config.tie_word_embeddings:
            shapes["lm_head.weight"] = tuple(self.lm_head.weight.shape)
        return shapes

    def parameter_for(self, disk_name: str) -> tuple[nn.Module, str]:
        if disk_name == "lm_head.weight":
            return self.lm_head, "weight"
        module_path, _, attr = disk_name.removeprefix("model.").rpartition(".")
        return self.model.get_submodule(module_path), attr

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def next_token(self, token_ids: torch.Tensor, cache: SessionCache, start: int) -> int:
        """Feed token_ids ([T] at positions start..) and return the argmax of the last logits."""
        cache.ensure(start + token_ids.shape[0], keep=start)
        hidden = self.model(token_ids, cache.layers, start)
        return int(self.lm_head(hidden[-1]).float().argmax())


class Decoder:
    """Greedy decoding of one sequence on its own SessionCache."""

    def __init__(self, lm: CausalLM, prompt_ids: Sequence[int], max_new_tokens: int,
                 stop_ids: frozenset[int]) -> None:
        c = lm.config
        weight = lm.model.embed_tokens.weight
        self.lm, self.stop_ids = lm, stop_ids
        self.prompt = torch.tensor(list(prompt_ids), dtype=torch.int64, device=weight.device)
        self.limit = min(len(prompt_ids) + max_new_tokens, c.max_position_embeddings)
        self.cache = SessionCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                                  c.max_position_embeddings, weight.device, weight.dtype,
                                  initial_tokens=self.limit)
        self.generated: list[int] = []
        self.done = self.limit <= len(prompt_ids)

    @property
    def length(self) -> int:
        return self.prompt.shape[0] + len(self.generated)

    def step(self) -> None:
        """Generate one token (the prompt is prefilled on the first step)."""
        if self.generated:
            ids = self.prompt.new_tensor([self.generated[-1]])
            token = self.lm.next_token(ids, self.cache, self.length - 1)
        else:
            token = self.lm.next_token(self.prompt, self.cache, 0)
        self.generated.append(token)
        self.done = token in self.stop_ids or self.length >= self.limit


@torch.inference_mode()
def greedy_generate(lm: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop_ids: frozenset[int]) -> list[list[int]]:
    """Greedy continuation of every prompt, in lockstep, each on its own KV cache; each list ends
    with its stop token when one was produced (at most max_new_tokens, never past the context)."""
    decoders = [Decoder(lm, ids, max_new_tokens, stop_ids) for ids in prompts]
    while active := [d for d in decoders if not d.done]:
        for decoder in active:
            decoder.step()
    return [d.generated for d in decoders]
