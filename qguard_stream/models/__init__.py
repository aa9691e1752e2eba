"""The reference model: the Qwen3 backbone (qwen3.py) and the guard heads and model (guard.py)."""

from qguard_stream.models.guard import HEAD_TENSOR_NAMES, GuardHead, GuardModel
from qguard_stream.models.qwen3 import Backbone

__all__ = ["HEAD_TENSOR_NAMES", "Backbone", "GuardHead", "GuardModel"]
