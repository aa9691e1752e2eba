"""StreamGuard: sessions (StreamState), incremental scoring (Verdicts), rollback, the card's API.

Each session owns a KV buffer; feeding k ids runs one forward over those k ids against it. A call
either completes (cache written, length advanced, verdicts returned) or raises with the session as
it was before the call. Label strings are made only when asked for. Policies, callbacks and batching
live elsewhere.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from qguard_stream.cache import SessionCache
from qguard_stream.config import GuardConfig
from qguard_stream.fastpath import FastBackbone, FastHead
from qguard_stream.graphs import DecodeRunner
from qguard_stream.hooks import Hooks, Monitor, dispatch
from qguard_stream.loader import default_dtype, load_model, load_tokenizer, resolve_checkpoint
from qguard_stream.model import GuardModel
from qguard_stream.policy import Policy

ROLES = ("user", "assistant")
TokenIds = int | Sequence[int] | torch.Tensor


class StreamClosedError(RuntimeError):
    """A closed StreamState was used again."""


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


_session_ids = itertools.count()


@dataclass(eq=False)
class StreamState:
    """One conversation: its KV cache, its tokens so far and its last verdicts."""

    cache: SessionCache | None
    id: int = field(default_factory=lambda: next(_session_ids))
    token_ids: list[int] = field(default_factory=list)
    last_verdicts: Verdicts | None = None
    monitor: Monitor | None = None  # policy + callbacks (qguard_stream.hooks); None: no dispatch

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def closed(self) -> bool:
        return self.cache is None


class StreamGuard:
    """A Qwen3Guard-Stream model scoring conversations token by token."""

    def __init__(self, model: GuardModel, tokenizer: Any = None, fast_path: bool = True,
                 use_cuda_graphs: bool | None = None) -> None:
        """`fast_path`: run the fused lean forward (fastpath.py) instead of the module-by-module
        core path. `use_cuda_graphs` (default: True on CUDA): replay captured CUDA graphs for
        steps of <= 16 tokens; needs `fast_path`."""
        self.model = model
        self.config: GuardConfig = model.config
        self.tokenizer = tokenizer
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.hooks = Hooks()  # callbacks for every session (qguard_stream.hooks)
        self.policy_factory: Callable[[], Policy] | None = None  # a policy per session, if set
        if use_cuda_graphs is None:
            use_cuda_graphs = fast_path and self.device.type == "cuda"
        if use_cuda_graphs and not fast_path:
            raise ValueError("use_cuda_graphs=True needs fast_path=True")
        self.fast = FastBackbone(model.model, self.config) if fast_path else None
        # The eager step's heads; on CUDA GuardHead itself runs the fused Triton kernel.
        self.fast_heads = None
        if fast_path and self.device.type == "cpu":
            self.fast_heads = {"user": FastHead(model.query), "assistant": FastHead(model.response)}
        self.runner = None
        if use_cuda_graphs:
            heads = {"user": model.query, "assistant": model.response}
            self.runner = DecodeRunner(self.fast, heads, capture=True)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str],
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, fast_path: bool = True,
                        use_cuda_graphs: bool | None = None) -> StreamGuard:
        """Load a checkpoint directory or Hugging Face repo id (default: bf16 on CUDA, fp32 on
        CPU)."""
        directory = resolve_checkpoint(path_or_id)
        config = GuardConfig.from_json(directory / "config.json")
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(directory, config, target, dtype or default_dtype(target))
        return cls(model, load_tokenizer(directory), fast_path=fast_path,
                   use_cuda_graphs=use_cuda_graphs)

    # ---- sessions ---------------------------------------------------------------------------
    def open_stream(self) -> StreamState:
        """A new, empty session."""
        c = self.config
        cache = SessionCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                             c.max_position_embeddings, self.device, self.dtype)
        return StreamState(cache=cache)

    def close_stream(self, state: StreamState) -> None:
        """Free the session's memory; using it again raises StreamClosedError."""
        state.cache = None
        state.last_verdicts = None

    def rollback(self, state: StreamState, length: int) -> None:
        """Keep only the first `length` tokens of the session (the kept part is not recomputed)."""
        self._check_open(state)
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"rollback length must be an int, got {length!r}")
        if not 0 <= length <= state.length:
            raise ValueError(
                f"cannot roll back to length {length}: the session holds {state.length} tokens"
            )
        del state.token_ids[length:]
        state.last_verdicts = None
        if state.monitor is not None:
            state.monitor.truncate(length)

    # ---- scoring ----------------------------------------------------------------------------
    @torch.inference_mode()
    def moderate(self, state: StreamState, token_ids: TokenIds, role: str) -> Verdicts:
        """Score `token_ids` appended to the session; role "user" reads the query heads,
        "assistant" the response heads. Returns verdicts for the new positions."""
        self._check_open(state)
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        ids = self._validate_ids(token_ids)
        start, new = state.length, ids.shape[0]
        limit = self.config.max_position_embeddings
        if start + new > limit:
            raise ValueError(
                f"feeding {new} tokens to a session of {start} would exceed "
                f"max_position_embeddings={limit}"
            )
        assert state.cache is not None
        state.cache.ensure(start + new, keep=start)
        probs = self.runner.step(ids, state.cache, start, role) if self.runner else None
        if probs is None:
            hidden = self._backbone(ids.to(self.device, non_blocking=True), state.cache, start)
            probs = (self.fast_heads[role] if self.fast_heads else self.model.head(role))(hidden)
        risk_probs, category_probs = probs
        verdicts = self._verdicts(role, range(start, start + new), ids, risk_probs, category_probs)
        state.token_ids.extend(verdicts.token_ids)
        state.last_verdicts = verdicts
        if state.monitor is not None or self.hooks or self.policy_factory is not None:
            dispatch(self, state, verdicts)  # after the state update, outside the forward
        return verdicts

    def _backbone(self, ids: torch.Tensor, cache: SessionCache, start: int) -> torch.Tensor:
        if self.fast is not None:
            return self.fast(ids, cache.buffer, start)
        return self.model.model(ids, cache.layers, start)

    def _verdicts(self, role: str, positions: range, ids: torch.Tensor, risk_probs: torch.Tensor,
                  category_probs: torch.Tensor) -> Verdicts:
        c = self.config
        user = role == "user"
        return Verdicts(
            role=role, positions=positions, token_ids=tuple(ids.tolist()),
            risk_probs=risk_probs, category_probs=category_probs,
            risk_labels=c.query_risk_levels if user else c.response_risk_levels,
            category_labels=c.query_categories if user else c.response_categories,
        )

    def _validate_ids(self, token_ids: TokenIds) -> torch.Tensor:
        """Return a 1-D int64 CPU tensor, or raise naming the offending value."""
        if isinstance(token_ids, bool):
            raise TypeError(f"token ids must be integers, got {token_ids!r}")
        if isinstance(token_ids, int):
            if not 0 <= token_ids < self.config.vocab_size:
                raise ValueError(f"token id {token_ids} is out of range "
                                 f"[0, {self.config.vocab_size}) (vocab_size)")
            return torch.tensor([token_ids])
        elif isinstance(token_ids, torch.Tensor):
            if token_ids.is_floating_point() or token_ids.is_complex() or \
                    token_ids.dtype == torch.bool:
                raise TypeError(f"token ids must be an integer tensor, got dtype {token_ids.dtype}")
            if token_ids.dim() > 1:
                raise ValueError(
                    f"token ids must be 0-D or 1-D, got shape {tuple(token_ids.shape)}")
            ids = token_ids.reshape(-1).to("cpu", torch.int64)
        else:
            ids = self._ids_from_sequence(token_ids)
        if ids.numel() == 0:
            raise ValueError("token ids are empty: nothing to moderate")
        if ids.numel() == 1:  # the per-token case: one host read instead of two reductions
            low = high = ids.item()
        else:
            low, high = (int(bound) for bound in ids.aminmax())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is out of range [0, {self.config.vocab_size}) (vocab_size)")
        return ids

    @staticmethod
    def _ids_from_sequence(token_ids: Any) -> torch.Tensor:
        try:
            values = list(token_ids)
        except TypeError:
            raise TypeError(f"token ids must be an int, a sequence of ints or a tensor, "
                            f"got {type(token_ids).__name__}") from None
        for value in values:
            if isinstance(value, bool) or (not isinstance(value, int) and not (
                    hasattr(value, "__index__") and not isinstance(value, float))):
                kind = "nested sequences (2-D)" if isinstance(value, (list, tuple)) else repr(value)
                raise TypeError(f"token ids must be integers, got {kind}")
        return torch.tensor([int(v) for v in values], dtype=torch.int64)

    @staticmethod
    def _check_open(state: StreamState) -> None:
        if not isinstance(state, StreamState):
            raise TypeError(f"expected a StreamState, got {type(state).__name__}")
        if state.closed:
            raise StreamClosedError(f"stream {state.id} is closed; open a new one")

    # ---- guarding token iterators (qguard_stream.integrations.watch) ----------------------------
    def watch(self, tokens: Any, **options: Any) -> Any:
        """`for t in guard.watch(token_iter, prompt=ids, holdback=N, chunk=k)`: each token with its
        verdict, stopping at a policy flag; see qguard_stream.integrations.watch.Watch."""
        from qguard_stream.integrations.watch import Watch

        return Watch(self, tokens, **options)

    def awatch(self, tokens: Any, **options: Any) -> Any:
        """The async twin of watch, for `async for`; see ...integrations.watch.AsyncWatch."""
        from qguard_stream.integrations.watch import AsyncWatch

        return AsyncWatch(self, tokens, **options)

    # ---- the model card's API ----------------------------------------------------------------
    def stream_moderate_from_ids(self, token_ids: TokenIds, role: str,
                                 stream_state: StreamState | None = None
                                 ) -> tuple[dict[str, list[Any]], StreamState]:
        """Drop-in for the model card: returns (result dict over this call's tokens, state)."""
        state = stream_state if stream_state is not None else self.open_stream()
        try:
            verdicts = self.moderate(state, token_ids, role)
        except Exception:
            if stream_state is None:
                self.close_stream(state)
            raise
        return verdicts.as_card_result(), state

    # ---- conversations ------------------------------------------------------------------------
    def moderate_conversation(self, messages: list[dict[str, str]], thinking: bool = False
                              ) -> ConversationVerdict:
        """Score a templated conversation: prompt verdict at the last user turn's <|im_end|> and
        per-token response verdicts over the span the official evaluation scores."""
        from qguard_stream.template import conversation_spans

        if self.tokenizer is None:
            raise RuntimeError("this guard has no tokenizer; load a checkpoint that ships one")
        spans = conversation_spans(self.tokenizer, messages, thinking=thinking)
        state = self.open_stream()
        try:
            prompt = self.moderate(state, spans.token_ids[: spans.user_end + 1], "user")
            response = None
            if spans.response_start is not None:
                after_prompt = self.moderate(state, spans.token_ids[spans.user_end + 1:],
                                             "assistant")
                response = after_prompt.since(spans.response_start)
        finally:
            self.close_stream(state)
        return ConversationVerdict(spans.token_ids, spans.user_end, spans.response_start,
                                   prompt, response)


@dataclass(frozen=True)
class ConversationVerdict:
    """Result of moderate_conversation."""

    token_ids: list[int]
    user_end: int  # index of the <|im_end|> closing the last user turn
    response_start: int | None  # first scored response position (None: no assistant turn)
    prompt_verdicts: Verdicts  # query heads over the prompt part; the verdict is the last one
    response_verdicts: Verdicts | None  # response heads over token_ids[response_start:]

    @property
    def prompt_risk_level(self) -> str:
        return self.prompt_verdicts.risk_level[-1]

    @property
    def prompt_category(self) -> str:
        return self.prompt_verdicts.category[-1]

