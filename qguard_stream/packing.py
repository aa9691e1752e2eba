"""Lists of Python ints as CPU tensors, packed through `array` (torch.frombuffer over its buffer):
about 3x faster than torch.tensor on a list, which matters where a step packs one list per chunk
or per metadata field (token ids, positions, block tables)."""

from __future__ import annotations

from array import array

import torch


def int32s(values: list[int]) -> torch.Tensor:
    """`values` as a 1-D int32 tensor (empty for an empty list)."""
    return torch.frombuffer(array("i", values), dtype=torch.int32) if values else \
        torch.empty(0, dtype=torch.int32)


def int64s(values: list[int]) -> torch.Tensor:
    """`values` as a 1-D int64 tensor (empty for an empty list)."""
    return torch.frombuffer(array("q", values), dtype=torch.int64) if values else \
        torch.empty(0, dtype=torch.int64)
