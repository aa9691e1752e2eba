"""Sessions, queued requests and the choice of what runs in the next step (continuous batching).

A request is one chunk of new tokens for one session; its KV blocks are reserved when it is queued,
so a queued request always fits. Each step takes, first come first served, at most one request per
session (a session's chunks must run in order) up to a token budget; sessions join and leave between
steps. This module owns no tensors beyond the token ids it queues and runs no model.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from qguard_stream.kvcache.paged import BlockTable
from qguard_stream.verdicts import Verdicts, next_session_id


@dataclass(eq=False)
class Session:
    """One conversation held by an Engine: its block table, its scored tokens, its last verdicts."""

    table: BlockTable
    id: int = field(default_factory=next_session_id)
    token_ids: list[int] = field(default_factory=list)  # scored so far
    reserved: int = 0  # positions with KV blocks reserved: scored + queued
    queued: int = 0  # requests queued and not yet scored
    closed: bool = False
    last_verdicts: Verdicts | None = None
    owner: Any = field(default=None, repr=False)  # the Engine whose pool holds its blocks

    @property
    def length(self) -> int:
        """Tokens scored so far."""
        return len(self.token_ids)


@dataclass(eq=False)
class Request:
    """A queued chunk: token_ids at positions start.. of `session`, scored with `role`'s heads."""

    session: Session
    start: int
    token_ids: torch.Tensor  # 1-D int64, CPU
    role: str
    future: Future[Verdicts] = field(default_factory=Future)

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


class Scheduler:
    """FIFO queue of requests; `next_batch` picks the requests of the next step."""

    def __init__(self, max_batch_tokens: int) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def next_batch(self) -> list[Request]:
        """Oldest first, one per session, within the token budget (an oversized first one runs
        alone rather than never)."""
        batch: list[Request] = []
        seen: set[int] = set()
        tokens = 0
        for request in self.waiting:
            if request.session.id in seen:
                continue
            seen.add(request.session.id)
            if batch and tokens + request.num_tokens > self.max_batch_tokens:
                continue
            batch.append(request)
            tokens += request.num_tokens
        if len(batch) == len(self.waiting):  # the common case: every queued chunk runs
            self.waiting.clear()
        else:
            chosen = {id(request) for request in batch}
            self.waiting = deque(r for r in self.waiting if id(r) not in chosen)
        return batch

    def remove_session(self, session: Session) -> list[Request]:
        """Take every queued request of `session` out of the queue and return them."""
        removed = [r for r in self.waiting if r.session is session]
        self.waiting = deque(r for r in self.waiting if r.session is not session)
        return removed
