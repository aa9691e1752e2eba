"""A minimal stand-in for the official `consecutive_unsafe` response policy, for the server only.

Flag at the second of the first two adjacent Unsafe response tokens (response verdict Unsafe, with
that token's category); failing that, the first adjacent Controversial pair gives Controversial;
otherwise Safe. Kept in this one class so it can be swapped for qguard_stream.policy at merge time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flag:
    position: int  # second token of the pair
    risk_level: str  # "Unsafe" or "Controversial"
    category: str

    def as_json(self) -> dict[str, Any]:
        return {"position": self.position, "risk_level": self.risk_level,
                "category": self.category}


class ConsecutiveUnsafeTracker:
    """Per-session state of the rule over response tokens, with rollback."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.levels: list[str] = []
        self.categories: list[str] = []
        self.flags: dict[str, Flag] = {}  # first flag per level

    def update(self, positions: range, levels: list[str], categories: list[str]) -> list[Flag]:
        """Add scored response tokens; return the flags they raised (at most one per level)."""
        raised = []
        for position, level, category in zip(positions, levels, categories):
            if self._pairs_with_previous(position, level) and level not in self.flags:
                self.flags[level] = Flag(position, level, category)
                raised.append(self.flags[level])
            self.positions.append(position)
            self.levels.append(level)
            self.categories.append(category)
        return raised

    def rollback(self, length: int) -> None:
        """Forget tokens at positions >= length and recompute the flags."""
        kept = [entry for entry in zip(self.positions, self.levels, self.categories)
                if entry[0] < length]
        self.positions, self.levels, self.categories, self.flags = [], [], [], {}
        for position, level, category in kept:
            self.update(range(position, position + 1), [level], [category])

    def decision(self) -> dict[str, Any]:
        """{"risk_level", "category", "flag_position"} of the response so far."""
        for level in ("Unsafe", "Controversial"):
            if level in self.flags:
                flag = self.flags[level]
                return {"risk_level": level, "category": flag.category,
                        "flag_position": flag.position}
        return {"risk_level": "Safe", "category": None, "flag_position": None}

    def _pairs_with_previous(self, position: int, level: str) -> bool:
        return (level in ("Unsafe", "Controversial") and bool(self.positions)
                and self.positions[-1] == position - 1 and self.levels[-1] == level)
