"""The guard model: the Qwen3 backbone plus the response and query guard paths (heads).

Parameter names mirror the checkpoint (`risk_level_head.weight`, `query_category_head.weight`, ...);
HEAD_TENSOR_NAMES maps them onto the two GuardHead modules.
"""

from __future__ import annotations

import torch
from torch import nn

from qguard_stream.config import GuardConfig
from qguard_stream.kernels import GuardHeadOutput, guard_head_scores
from qguard_stream.models.qwen3 import Backbone, RMSNorm


class GuardHead(nn.Module):
    """One guard path: projection -> RMSNorm -> risk and category linear heads.

    On CUDA (with triton) the whole path is one fused kernel; set `fused = False` to run the plain
    PyTorch formula there too. Elsewhere it is always the plain formula.
    """

    def __init__(self, config: GuardConfig, num_risk: int, num_category: int,
                 fused: bool = True) -> None:
        super().__init__()
        self.pre = nn.Linear(config.hidden_size, config.guard_inner_size, bias=False)
        self.layernorm = RMSNorm(config.guard_inner_size, config.rms_norm_eps)
        self.risk = nn.Linear(config.guard_inner_size, num_risk, bias=False)
        self.category = nn.Linear(config.guard_inner_size, num_category, bias=False)
        self.fused = fused

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (risk_probs, category_probs) in fp32."""
        scores = self.scores(hidden)
        return scores.risk_probs, scores.category_probs

    def scores(self, hidden: torch.Tensor) -> GuardHeadOutput:
        """hidden [k, hidden_size] -> probabilities plus each row's winning id and probability."""
        return guard_head_scores(hidden, self.pre.weight, self.layernorm.weight, self.risk.weight,
                                 self.category.weight, self.layernorm.eps, fused=self.fused)


# Checkpoint name -> (head attribute, submodule) for the two guard paths.
HEAD_TENSOR_NAMES: dict[str, tuple[str, str]] = {
    f"{prefix}{name}.weight": (path, sub)
    for path, prefix in (("response", ""), ("query", "query_"))
    for name, sub in (("risk_level_category_pre", "pre"),
                      ("risk_level_category_layernorm", "layernorm"),
                      ("risk_level_head", "risk"), ("category_head", "category"))
}


class GuardModel(nn.Module):
    """Backbone plus the response and query guard paths."""

    def __init__(self, config: GuardConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.response = GuardHead(config, config.num_risk_levels, config.num_response_categories)
        self.query = GuardHead(config, len(config.query_risk_levels), config.num_query_categories)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor name -> shape, for every tensor the guard needs."""
        shapes = {f"model.{name}": tuple(p.shape) for name, p in self.model.named_parameters()}
        for disk_name, (path, sub) in HEAD_TENSOR_NAMES.items():
            shapes[disk_name] = tuple(getattr(getattr(self, path), sub).weight.shape)
        return shapes

    def parameter_for(self, disk_name: str) -> tuple[nn.Module, str]:
        """The module and attribute that hold a checkpoint tensor."""
        if disk_name in HEAD_TENSOR_NAMES:
            path, sub = HEAD_TENSOR_NAMES[disk_name]
            return getattr(getattr(self, path), sub), "weight"
        module_path, _, attr = disk_name.removeprefix("model.").rpartition(".")
        return self.model.get_submodule(module_path), attr

    def use_fused_heads(self, enabled: bool) -> None:
        """Turn the fused Triton guard-head kernel on or off for both paths (it only ever runs
        on CUDA)."""
        self.response.fused = self.query.fused = enabled

    def head(self, role: str) -> GuardHead:
        return self.query if role == "user" else self.response
