"""The session contract every front-end shares: token-id validation, the Verdicts of the scored
positions and their JSON shape, session ids and the closed-session error.

StreamGuard, the engine and the server all call `validate_token_ids` on input, `build_verdicts`
on output and the `*_json` functions to render, so an id is accepted or refused with the same
message, and a verdict reads the same, whichever way it was scored. Nothing here runs a model.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from qguard_stream.config import GuardConfig
from qguard_stream.packing import int64s

ROLES = ("user", "assistant")
TokenIds = int | Sequence[int] | torch.Tensor


class StreamClosedError(RuntimeError):
    """A closed session was used again."""


class NonFiniteScoresError(RuntimeError):
    """The model produced NaN or infinite probabilities (non-finite weights or activations):
    no label is made from them. The session is left as it was before the call."""


class ForeignSessionError(ValueError):
    """A session was passed to a guard or engine other than the one that opened it (its KV
    blocks live in the other's pool); refused before anything runs."""


_session_ids = itertools.count()


def next_session_id() -> int:
    """A process-wide unique session id (StreamGuard and Engine sessions draw from one counter,
    so an id names one session whichever front-end opened it)."""
    return next(_session_ids)


def check_role(role: str) -> str:
    """Return `role`, or raise ValueError naming it and the roles allowed."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return role


@dataclass(frozen=True)
class Verdicts:
    """Per-token verdicts for the positions scored by one call (last = newest)."""

    role: str
    positions: range
    token_ids: tuple[int, ...]
    risk_probs: torch.Tensor  # [k, num_risk_levels] fp32, on the model's device
    category_probs: torch.Tensor  # [k, num_categories] fp32
    risk_labels: tuple[str, ...] = field(repr=False)
    category_labels: tuple[str, ...] = field(repr=False)

    def __len__(self) -> int:
        return len(self.positions)

    @cached_property
    def _winners(self) -> tuple[list[int], list[float], list[int], list[float]]:
        risk_prob, risk_id = self.risk_probs.max(dim=-1)
        cat_prob, cat_id = self.category_probs.max(dim=-1)
        return risk_id.tolist(), risk_prob.tolist(), cat_id.tolist(), cat_prob.tolist()

    @property
    def risk_ids(self) -> list[int]:
        return self._winners[0]

    @property
    def risk_level(self) -> list[str]:
        """Winning risk label per token ("Safe", "Unsafe", "Controversial")."""
        return [self.risk_labels[i] for i in self._winners[0]]

    @property
    def risk_prob(self) -> list[float]:
        return self._winners[1]

    @property
    def category_ids(self) -> list[int]:
        return self._winners[2]

    @property
    def category(self) -> list[str]:
        """Winning category per token (meaningful only where the risk is not Safe)."""
        return [self.category_labels[i] for i in self._winners[2]]

    @property
    def category_prob(self) -> list[float]:
        return self._winners[3]

    def since(self, position: int) -> Verdicts:
        """The verdicts for positions >= `position` (a view, no copy of the probabilities)."""
        offset = max(0, position - self.positions.start)
        return Verdicts(self.role, self.positions[offset:], self.token_ids[offset:],
                        self.risk_probs[offset:], self.category_probs[offset:],
                        self.risk_labels, self.category_labels)

    def as_card_result(self) -> dict[str, list[Any]]:
        """The model card's result dict: winning labels and their probabilities rounded to 2dp."""
        return {
            "risk_level": self.risk_level,
            "risk_prob": [round(p, 2) for p in self.risk_prob],
            "category": self.category,
            "category_prob": [round(p, 2) for p in self.category_prob],
        }


def validate_token_ids(token_ids: TokenIds, vocab_size: int) -> torch.Tensor:
    """Token ids as a 1-D int64 CPU tensor, or TypeError / ValueError naming the offending value:
    a bool, a float or nested sequence, a dict or set (no order: refused), an empty input, or an
    id outside [0, vocab_size). An int, a numpy integer scalar, a sequence, a numpy array or an
    integer tensor are accepted."""
    if type(token_ids) is list:  # the streaming case, checked cheaply
        if len(token_ids) == 1:
            if type(token_ids[0]) is int and 0 <= token_ids[0] < vocab_size:
                return int64s(token_ids)
        elif token_ids and all(type(v) is int for v in token_ids) \
                and min(token_ids) >= 0 and max(token_ids) < vocab_size:
            return int64s(token_ids)
    if isinstance(token_ids, bool):
        raise TypeError(f"token ids must be integers, got {token_ids!r}")
    if _is_numpy_integer_scalar(token_ids):
        token_ids = operator.index(token_ids)
    if isinstance(token_ids, int):
        _check_range(token_ids, token_ids, vocab_size)
        return torch.tensor([token_ids])
    if isinstance(token_ids, (Mapping, Set)):
        raise TypeError(f"token ids must be an ordered sequence, got a {type(token_ids).__name__} "
                        f"(a dict's keys or a set's members have no token order)")
    if isinstance(token_ids, torch.Tensor):
        if token_ids.is_floating_point() or token_ids.is_complex() or \
                token_ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got dtype {token_ids.dtype}")
        if token_ids.dim() > 1:
            raise ValueError(f"token ids must be 0-D or 1-D, got shape {tuple(token_ids.shape)}")
        ids = token_ids.reshape(-1).to("cpu", torch.int64)
    else:
        ids = _ids_from_sequence(token_ids, vocab_size)
    if ids.numel() == 0:
        raise ValueError("token ids are empty: nothing to moderate")
    if ids.numel() == 1:  # the per-token case: one host read instead of two reductions
        low = high = ids.item()
    else:
        low, high = (int(bound) for bound in ids.aminmax())
    _check_range(low, high, vocab_size)
    return ids


def _check_range(low: int, high: int, vocab_size: int) -> None:
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is out of range [0, {vocab_size}) (vocab_size)")


def _is_numpy_integer_scalar(value: Any) -> bool:
    """A numpy integer scalar or 0-d integer array (numpy itself is not imported for this)."""
    dtype = getattr(value, "dtype", None)
    return getattr(value, "ndim", None) == 0 and getattr(dtype, "kind", None) in ("i", "u")


def _ids_from_sequence(token_ids: Any, vocab_size: int) -> torch.Tensor:
    try:
        values = list(token_ids)
    except TypeError:
        raise TypeError(f"token ids must be an int, a sequence of ints or a tensor, "
                        f"got {type(token_ids).__name__}") from None
    ints = []
    for value in values:
        if isinstance(value, bool) or (not isinstance(value, int) and not (
                hasattr(value, "__index__") and not isinstance(value, float))):
            kind = "nested sequences (2-D)" if isinstance(value, (list, tuple)) else repr(value)
            raise TypeError(f"token ids must be integers, got {kind}")
        value = int(value)
        if not 0 <= value < vocab_size:  # before int64 packing, which overflows past 2**63
            _check_range(value, value, vocab_size)
        ints.append(value)
    return torch.tensor(ints, dtype=torch.int64)


def build_verdicts(config: GuardConfig, role: str, start: int, token_ids: torch.Tensor,
                   risk_probs: torch.Tensor, category_probs: torch.Tensor,
                   checked: bool = False) -> Verdicts:
    """The Verdicts of `token_ids` scored at positions start.. with `role`'s heads (labels from
    the checkpoint's config). Raises NonFiniteScoresError if a probability is NaN or infinite
    (a NaN logit makes its whole softmax row NaN, so the sums show it with one host read);
    `checked`: the caller already found them finite (a whole step at once)."""
    if not checked and not (_finite_sum(risk_probs) and _finite_sum(category_probs)):
        bad = ~(torch.isfinite(risk_probs).all(1) & torch.isfinite(category_probs).all(1))
        positions = [start + int(i) for i in bad.nonzero().flatten()[:8]]
        raise NonFiniteScoresError(
            f"the model produced non-finite {role} probabilities at positions {positions}: its "
            f"weights or activations hold NaN/Inf (load with check_finite=True to find the "
            f"tensor); no verdict was made")
    user = role == "user"
    return Verdicts(
        role=role, positions=range(start, start + token_ids.shape[0]),
        token_ids=tuple(token_ids.tolist()), risk_probs=risk_probs,
        category_probs=category_probs,
        risk_labels=config.query_risk_levels if user else config.response_risk_levels,
        category_labels=config.query_categories if user else config.response_categories,
    )


def _finite_sum(probs: torch.Tensor) -> bool:
    """Whether a [k, n] host tensor holds no NaN/Inf, read through its sum (NaN and +-Inf
    survive a sum of probabilities). Up to 64 rows, summed from one host list: a step scores a
    few tokens per chunk, where two torch reductions cost more than the list."""
    if probs.is_cpu and probs.shape[0] <= 64:
        return math.isfinite(sum(map(sum, probs.tolist())))
    return math.isfinite(float(probs.sum()))


# ---- JSON ------------------------------------------------------------------------------------
def verdicts_json(verdicts: Verdicts) -> dict[str, Any]:
    """Per-token verdicts of one call: winning labels and their full-precision probabilities."""
    return {
        "role": verdicts.role,
        "start": verdicts.positions.start,
        "token_ids": list(verdicts.token_ids),
        "risk_level": verdicts.risk_level,
        "risk_prob": verdicts.risk_prob,
        "category": verdicts.category,
        "category_prob": verdicts.category_prob,
    }


def empty_verdicts_json(role: str, start: int) -> dict[str, Any]:
    """A call that scored nothing (a text feed whose delta completed no token yet)."""
    return {"role": role, "start": start, "token_ids": [], "risk_level": [], "risk_prob": [],
            "category": [], "category_prob": []}


def last_verdict_json(verdicts: Verdicts) -> dict[str, Any]:
    """The verdict at the newest position (how a prompt verdict is read)."""
    return {"position": verdicts.positions[-1], "risk_level": verdicts.risk_level[-1],
            "risk_prob": verdicts.risk_prob[-1], "category": verdicts.category[-1],
            "category_prob": verdicts.category_prob[-1]}
