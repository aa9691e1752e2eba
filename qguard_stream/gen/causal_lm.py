"""The Qwen3 causal LM behind Qwen3Guard-Gen: the Backbone plus lm_head.

Loading reuses the guard's loader (same tensor names under `model.`, same checks); the LM head is
`lm_head.weight`, or the embedding matrix when the config ties them. Decoding lives in decode.py
(on the paged runner). This module knows nothing of chat templates or verdict text.
"""

from __future__ import annotations

from torch import nn

from qguard_stream.config import GuardConfig
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
