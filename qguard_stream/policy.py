"""Decision rules: turn per-token response verdicts into Unsafe / Controversial decisions.

Two forms of the official rule live here and are tested against each other:
- `consecutive_unsafe(levels)`: a pure function over a whole list of per-token labels, identical to
  the official evaluation (QwenLM/Qwen3Guard eval/eval_stream.py): the first run of `window`
  adjacent Unsafe tokens anywhere gives ("Unsafe", index of the run's last token); failing that,
  the first run of `window` adjacent Controversial tokens gives ("Controversial", index); otherwise
  ("Safe", -1). Unsafe and Controversial never mix in a run.
- `ConsecutiveUnsafe`: the same rule as a streaming state machine fed one token at a time.
  It emits a decision the moment a run completes:
  * an Unsafe run -> Decision("Unsafe", stop=True). Because the pure function looks for an Unsafe
    run first over the *whole* list, the first Unsafe decision of the stream is exactly the pure
    function's verdict whenever the list holds an Unsafe run, at the same index.
  * the first Controversial run -> Decision("Controversial", stop=strict). In loose mode (default)
    this is a report, not a stop: the stream goes on and a later Unsafe run still stops it, just as
    the pure function lets a later Unsafe pair override an earlier Controversial one. In strict mode
    it stops the stream: the strict metric maps a Controversial response to Unsafe, so a stream
    stopped there gets the same strict label; only the flag *index* can differ from the pure
    function's (which would report a later Unsafe run, never seen because the stream stopped).
  * `verdict()` after a whole sequence has been fed (stop signals ignored) equals the pure function.
- `ProbabilityThreshold`: flag when P(Unsafe) (strict: P(Unsafe) + P(Controversial)) stays >= t for
  `window` adjacent tokens.

A policy sees only the tokens it is given (response tokens, by the Monitor); it knows nothing of
sessions, callbacks or the model. `truncate(length)` follows a session rollback by replaying the
kept part of its own history, so decisions always describe the tokens currently in the session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qguard_stream.verdicts import Verdicts

SAFE, UNSAFE, CONTROVERSIAL = "Safe", "Unsafe", "Controversial"


def consecutive_unsafe(levels: Sequence[str], window: int = 2) -> tuple[str, int]:
    """The official response verdict over per-token labels: (label, index of the flagged token),
    index -1 when Safe. `window=2` is the official rule."""
    _check_window(window)
    for label in (UNSAFE, CONTROVERSIAL):
        run = 0
        for index, level in enumerate(levels):
            run = run + 1 if level == label else 0
            if run >= window:
                return label, index
    return SAFE, -1


@dataclass(frozen=True)
class TokenVerdict:
    """One scored token as policies and callbacks see it."""

    position: int  # position in the session
    token_id: int
    role: str
    risk_level: str
    risk_prob: float  # probability of the winning level
    category: str
    category_prob: float
    risk_probs: tuple[float, ...]  # every level, in head order
    risk_labels: tuple[str, ...]  # label of each entry of risk_probs

    def prob(self, label: str) -> float:
        """Probability of the level named `label` (0.0 if this head has no such level)."""
        return self.risk_probs[self.risk_labels.index(label)] if label in self.risk_labels else 0.0


@dataclass(frozen=True)
class Decision:
    """A policy's decision. `index` counts the tokens the policy has seen (0 = first response
    token), matching the pure function's index; `position` is the session position."""

    label: str  # "Unsafe", "Controversial" or "Safe"
    index: int  # -1 when Safe
    position: int  # -1 when Safe
    start_position: int  # first token of the run that triggered it; -1 when Safe
    token_id: int  # -1 when Safe
    category: str  # category of the flagged token ("" when Safe)
    risk_prob: float  # winning probability at the flagged token (0.0 when Safe)
    stop: bool  # True: the caller should stop the stream here
    rule: str

    @property
    def flagged(self) -> bool:
        return self.label != SAFE


def decision_json(decision: Decision) -> dict[str, Any]:
    """A verdict as JSON: {"risk_level", "category", "flag_position"} (null category and
    position when Safe)."""
    if not decision.flagged:
        return {"risk_level": SAFE, "category": None, "flag_position": None}
    return {"risk_level": decision.label, "category": decision.category,
            "flag_position": decision.position}


def flag_json(decision: Decision) -> dict[str, Any]:
    """A decision the moment it is made, as JSON: {"position", "risk_level", "category", "stop"}."""
    return {"position": decision.position, "risk_level": decision.label,
            "category": decision.category, "stop": decision.stop}


def _safe(rule: str) -> Decision:
    return Decision(SAFE, -1, -1, -1, -1, "", 0.0, False, rule)


def _decision(label: str, index: int, run: int, token: TokenVerdict, stop: bool,
              rule: str) -> Decision:
    return Decision(label, index, token.position, token.position - run + 1, token.token_id,
                    token.category, token.risk_prob, stop, rule)


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")


class Policy:
    """Base: keeps the tokens seen (for rollback) and the decisions made so far. A new rule
    subclasses it and implements `_step` (one token -> decision or None), `_reset_rule` and
    `fresh`; everything it remembers must be rebuilt by replaying `observe`."""

    rule = "policy"

    def __init__(self) -> None:
        self.history: list[TokenVerdict] = []
        self.decisions: list[Decision] = []

    def observe(self, token: TokenVerdict) -> Decision | None:
        """Feed one token; return a new decision, or None."""
        self.history.append(token)
        decision = self._step(token, len(self.history) - 1)
        if decision is not None:
            self.decisions.append(decision)
        return decision

    @property
    def stop_decision(self) -> Decision | None:
        """The first decision that asks the stream to stop, if any."""
        return next((d for d in self.decisions if d.stop), None)

    def verdict(self) -> Decision:
        """The policy's verdict on everything seen so far (Safe when nothing was flagged)."""
        return self.stop_decision or (self.decisions[0] if self.decisions else _safe(self.rule))

    def truncate(self, length: int) -> None:
        """Forget tokens at session positions >= length (after a rollback) by replaying the rest."""
        kept = [t for t in self.history if t.position < length]
        self.reset()
        for token in kept:
            self.observe(token)

    def reset(self) -> None:
        self.history.clear()
        self.decisions.clear()
        self._reset_rule()

    def fresh(self) -> Policy:
        """A new policy with the same settings and no state (one per session)."""
        raise NotImplementedError

    def _step(self, token: TokenVerdict, index: int) -> Decision | None:
        raise NotImplementedError

    def _reset_rule(self) -> None:
        raise NotImplementedError


class ConsecutiveUnsafe(Policy):
    """The official rule as a streaming state machine (see the module docstring).

    strict=False (default): a Controversial run is reported (stop=False); only Unsafe stops.
    strict=True: the first Controversial run stops too.
    """

    rule = "consecutive_unsafe"

    def __init__(self, window: int = 2, strict: bool = False) -> None:
        _check_window(window)
        self.window, self.strict = window, strict
        super().__init__()
        self._reset_rule()

    def fresh(self) -> ConsecutiveUnsafe:
        return ConsecutiveUnsafe(self.window, self.strict)

    def _reset_rule(self) -> None:
        self._level, self._run = SAFE, 0
        self._unsafe_seen = self._controversial_seen = False

    def verdict(self) -> Decision:
        """Equals `consecutive_unsafe` over the levels seen: the first Unsafe run wins over any
        Controversial run, whatever their order."""
        unsafe = next((d for d in self.decisions if d.label == UNSAFE), None)
        return unsafe or (self.decisions[0] if self.decisions else _safe(self.rule))

    def _step(self, token: TokenVerdict, index: int) -> Decision | None:
        level = token.risk_level
        self._run = self._run + 1 if level == self._level else 1
        self._level = level
        if self._run != self.window:
            return None
        if level == UNSAFE and not self._unsafe_seen:
            self._unsafe_seen = True
            return _decision(UNSAFE, index, self._run, token, True, self.rule)
        if level == CONTROVERSIAL and not self._controversial_seen:
            self._controversial_seen = True
            return _decision(CONTROVERSIAL, index, self._run, token, self.strict, self.rule)
        return None


class ProbabilityThreshold(Policy):
    """Flag (stop) when P(Unsafe) - or P(Unsafe) + P(Controversial) when strict - stays >=
    `threshold` for `window` adjacent tokens. The decision's label is "Unsafe"."""

    rule = "probability_threshold"

    def __init__(self, threshold: float, window: int = 2, strict: bool = False) -> None:
        _check_window(window)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        self.threshold, self.window, self.strict = threshold, window, strict
        super().__init__()
        self._reset_rule()

    def fresh(self) -> ProbabilityThreshold:
        return ProbabilityThreshold(self.threshold, self.window, self.strict)

    def _reset_rule(self) -> None:
        self._run = 0

    def score(self, token: TokenVerdict) -> float:
        unsafe = token.prob(UNSAFE)
        return unsafe + token.prob(CONTROVERSIAL) if self.strict else unsafe

    def _step(self, token: TokenVerdict, index: int) -> Decision | None:
        self._run = self._run + 1 if self.score(token) >= self.threshold else 0
        if self._run == self.window and not self.decisions:
            return _decision(UNSAFE, index, self._run, token, True, self.rule)
        return None


POLICIES = "official | strict | threshold:P (0 < P <= 1)"


@dataclass(frozen=True)
class GuardPolicy:
    """A named decision policy, as servers and gateways take it in text: how prompts and
    responses are judged."""

    name: str
    strict: bool = False
    threshold: float | None = None

    @classmethod
    def parse(cls, text: str) -> GuardPolicy:
        """'official' (Unsafe flags; the official rule), 'strict' (Controversial flags too) or
        'threshold:P' (P(Unsafe) >= P flags); ValueError naming the text otherwise."""
        value = (text or "").strip().lower() if isinstance(text, str) else text
        if value in ("official", "strict"):
            return cls(value, strict=value == "strict")
        if isinstance(value, str) and value.startswith("threshold:"):
            try:
                threshold = float(value.split(":", 1)[1])
            except ValueError:
                threshold = -1.0
            if 0.0 < threshold <= 1.0:
                return cls(value, threshold=threshold)
        raise ValueError(f"policy must be {POLICIES}, got {text!r}")

    def response_policy(self) -> Policy:
        if self.threshold is not None:
            return ProbabilityThreshold(self.threshold)
        return ConsecutiveUnsafe(strict=self.strict)

    def prompt_flagged(self, verdicts: Verdicts) -> bool:
        """The prompt verdict (the query heads at the last user turn's <|im_end|>) flags?"""
        level = verdicts.risk_level[-1]
        if self.threshold is not None:
            labels = verdicts.risk_labels
            probs = verdicts.risk_probs[-1].tolist()
            return UNSAFE in labels and probs[labels.index(UNSAFE)] >= self.threshold
        return level == UNSAFE or (self.strict and level == CONTROVERSIAL)


OFFICIAL = GuardPolicy("official")
