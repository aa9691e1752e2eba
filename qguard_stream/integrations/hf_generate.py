"""transformers `generate()` integration: a StoppingCriteria that guards every row of a batch.

transformers (5.x) calls each StoppingCriteria after appending the step's tokens, with the whole
`input_ids` [batch, length], and expects a bool tensor [batch] (True = this row is done); a streamer
receives the step's tokens right after. `GuardStoppingCriteria` keeps one guard session per row:
on its first call it feeds each row's prompt (leading pad tokens stripped; the part through the last
<|im_end|> as "user", the assistant header after it as "assistant", both before the policy starts
judging) and then, on every call, the row's new tokens as "assistant". A row whose policy asks to
stop is reported done from then on and is not fed again; a row that emitted an EOS id is not fed
after it. Rows stopped by the guard get generate's pad token afterwards only when generate has an
EOS criterion (an eos_token_id); otherwise transformers keeps sampling them until every row stops.

The flagged token itself is already in the output: generate appends before it checks. A plain
streamer would also receive it (transformers hands tokens to the streamer after the criteria);
wrap the streamer in `HoldbackStreamer(streamer, criteria, holdback=N)` to release each token only
once N later tokens were scored and never release the flagged span. Use `criteria.decision(row)` to
see which position was flagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from qguard_stream.hooks import Hooks, attach
from qguard_stream.integrations.watch import feed_prompt
from qguard_stream.policy import ConsecutiveUnsafe, Decision, Policy

if TYPE_CHECKING:
    from qguard_stream.stream import StreamGuard, StreamState


class GuardStoppingCriteria(StoppingCriteria):
    """Stops each row of `generate()` when the guard's policy flags it (one session per row).

    prompt_length: prompt columns of input_ids (default: all columns seen at the first call but
    the newest one). pad_token_id: stripped from the left of prompts. eos_token_id: after one of
    these a row is not fed any more (default: the guard's <|im_end|> id). Call `close()` when done
    (or use the object as a context manager) to free the sessions.
    """

    def __init__(self, guard: StreamGuard, policy: Policy | None = None,
                 prompt_length: int | None = None, pad_token_id: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, hooks: Hooks | None = None):
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a qguard_stream.policy.Policy, got {policy!r}")
        if prompt_length is not None and (not isinstance(prompt_length, int) or prompt_length < 0):
            raise ValueError(f"prompt_length must be an integer >= 0, got {prompt_length!r}")
        self.guard, self.policy, self.hooks = guard, policy or ConsecutiveUnsafe(), hooks
        self.prompt_length, self.pad_token_id = prompt_length, pad_token_id
        eos = guard.config.eos_token_id if eos_token_id is None else eos_token_id
        self.eos_token_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.sessions: list[StreamState] = []
        self._fed: list[int] = []
        self._stopped: list[bool] = []
        self._ended: list[bool] = []

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None,
                 **kwargs: Any) -> torch.BoolTensor:
        rows = input_ids.detach().to("cpu").tolist()
        if not self.sessions:
            self._open(rows)
        if len(rows) != len(self.sessions):
            raise ValueError(f"input_ids has {len(rows)} rows but this criteria guards "
                             f"{len(self.sessions)}; use one GuardStoppingCriteria per generate "
                             "call")
        for row, ids in enumerate(rows):
            self._feed(row, ids)
        return torch.tensor(self._stopped, dtype=torch.bool, device=input_ids.device)

    def decision(self, row: int) -> Decision | None:
        """The stop decision for `row` (position counted in that row's session), or None."""
        return self.sessions[row].monitor.stop_decision if self.sessions else None

    @property
    def stopped(self) -> list[bool]:
        return list(self._stopped)

    def close(self) -> None:
        for state in self.sessions:
            if not state.closed:
                self.guard.close_stream(state)

    def __enter__(self) -> GuardStoppingCriteria:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, rows: list[list[int]]) -> None:
        length = len(rows[0]) - 1 if self.prompt_length is None else self.prompt_length
        for ids in rows:
            prompt = self._strip_padding(ids[:length])
            state = self.guard.open_stream()
            feed_prompt(self.guard, state, prompt or None)
            attach(state, self.policy.fresh(), self.hooks)
            self.sessions.append(state)
        self._fed = [length] * len(rows)
        self._stopped = [False] * len(rows)
        self._ended = [False] * len(rows)

    def _strip_padding(self, prompt: list[int]) -> list[int]:
        start = 0
        while self.pad_token_id is not None and start < len(prompt) \
                and prompt[start] == self.pad_token_id:
            start += 1
        return prompt[start:]

    def _feed(self, row: int, ids: list[int]) -> None:
        new, self._fed[row] = ids[self._fed[row]:], len(ids)
        if self._stopped[row] or self._ended[row] or not new:
            return
        for index, token in enumerate(new):
            if token in self.eos_token_ids:
                new, self._ended[row] = new[:index + 1], True
                break
        state = self.sessions[row]
        self.guard.moderate(state, new, "assistant")
        self._stopped[row] = state.monitor.stop_decision is not None


def guard_criteria(guard: StreamGuard, **options: Any) -> tuple[StoppingCriteriaList,
                                                                GuardStoppingCriteria]:
    """(a StoppingCriteriaList to pass as generate(stopping_criteria=...), the criteria itself)."""
    criteria = GuardStoppingCriteria(guard, **options)
    return StoppingCriteriaList([criteria]), criteria


class HoldbackStreamer(BaseStreamer):
    """Wraps a streamer for single-row generate(): the prompt passes through; each generated token
    reaches the inner streamer once `holdback` later tokens were scored; once the guard stops the
    row, everything not yet released (the flagged token included) is withheld for good."""

    def __init__(self, streamer: BaseStreamer, criteria: GuardStoppingCriteria,
                 holdback: int = 0) -> None:
        if isinstance(holdback, bool) or not isinstance(holdback, int) or holdback < 0:
            raise ValueError(f"holdback must be an integer >= 0, got {holdback!r}")
        self.streamer, self.criteria, self.holdback = streamer, criteria, holdback
        self.held: list[int] = []
        self.withheld: list[int] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            self.streamer.put(value)
            return
        if (value.dim() > 1 and value.shape[0] != 1) or (value.dim() == 1 and value.numel() != 1):
            raise ValueError(f"HoldbackStreamer supports batch size 1, got {tuple(value.shape)}")
        if self.withheld:
            return  # the row was stopped: what follows is padding
        self.held.append(int(value.reshape(-1)[0]))
        if self.criteria.stopped and self.criteria.stopped[0]:
            self.withheld, self.held = self.held, []
            return
        self._release(len(self.held) - self.holdback)

    def end(self) -> None:
        if not self.withheld:
            self._release(len(self.held))
        self.streamer.end()

    def _release(self, count: int) -> None:
        if count > 0:
            released, self.held = self.held[:count], self.held[count:]
            self.streamer.put(torch.tensor(released))
