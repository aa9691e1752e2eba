"""StreamGuard: sessions (StreamState), incremental scoring, rollback, the card's API.

Each session is a block table into the guard's paged KV pool (kvcache/paged.py); feeding k ids runs
one step over those k ids through the paged runner (runtime/paged.py) as a batch of one, the same
runner the engine batches many sessions through. A call either completes (cache written, length
advanced, verdicts returned) or raises with the session as it was before the call. Label strings
are made only when asked for (verdicts.Verdicts). Policies and callbacks run after the forward
(hooks.Monitor); batching lives in qguard_stream.engine.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qguard_stream.config import GuardConfig
from qguard_stream.conversation import ConversationVerdict, plan_conversation
from qguard_stream.hooks import Hooks, Monitor, dispatch
from qguard_stream.kvcache.paged import (
    BlockPool,
    BlockTable,
    LayerView,
    blocks_for_budget,
    default_block_size,
    default_kv_gb,
)
from qguard_stream.loader import default_dtype, load_model, load_tokenizer, resolve_checkpoint
from qguard_stream.models.guard import GuardModel
from qguard_stream.policy import Policy
from qguard_stream.runtime.outputs import GuardScores, Probs
from qguard_stream.runtime.paged import Chunk, PagedRunner
from qguard_stream.runtime.weights import FusedWeights
from qguard_stream.verdicts import (
    ForeignSessionError,
    StreamClosedError,
    TokenIds,
    Verdicts,
    build_verdicts,
    check_role,
    next_session_id,
    validate_token_ids,
)


@dataclass(eq=False)
class StreamState:
    """One conversation: its KV cache (a block table into the guard's paged pool), its tokens so
    far and its last verdicts."""

    cache: BlockTable | None
    id: int = field(default_factory=next_session_id)
    token_ids: list[int] = field(default_factory=list)
    last_verdicts: Verdicts | None = None
    monitor: Monitor | None = None  # policy + callbacks (qguard_stream.hooks); None: no dispatch
    release: weakref.finalize | None = field(default=None, repr=False)  # frees paged blocks
    owner: Any = field(default=None, repr=False)  # the StreamGuard whose pool holds the blocks

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def closed(self) -> bool:
        return self.cache is None

    def check_open(self) -> None:
        """Raise StreamClosedError if the session was closed."""
        if self.closed:
            raise StreamClosedError(f"stream {self.id} is closed; open a new one")


class StreamGuard:
    """A Qwen3Guard-Stream model scoring conversations token by token."""

    def __init__(self, model: GuardModel, tokenizer: Any = None, fast_path: bool = True,
                 use_cuda_graphs: bool | None = None, kv_memory_gb: float | None = None) -> None:
        """Every session's K/V lives in one paged pool of `kv_memory_gb` GiB (default
        default_kv_gb(device): 2 on CUDA, 4 on the CPU, committed there only as used; a session
        growing past it raises PoolExhaustedError and is left as it was). `fast_path`: run the
        paged runner (runtime/paged.py: C steps on an fp32 or bf16 CPU; on CUDA, steps of <= 16
        tokens replay CUDA graphs captured at the first open_stream, `use_cuda_graphs`, default
        True)
        instead of the module-by-module reference model, which stays for parity checks."""
        self.model = model
        self.config: GuardConfig = model.config
        self.tokenizer = tokenizer
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.hooks = Hooks()  # callbacks for every session (qguard_stream.hooks)
        self.policy_factory: Callable[[], Policy] | None = None  # a policy per session, if set
        if use_cuda_graphs and not (fast_path and self.device.type == "cuda"):
            raise ValueError(f"use_cuda_graphs=True needs fast_path=True and a CUDA model, got "
                             f"fast_path={fast_path} on {self.device}")
        self.fast = FusedWeights(model.model, self.config) if fast_path else None
        self._use_cuda_graphs = use_cuda_graphs
        self._kv_memory_gb = default_kv_gb(self.device) if kv_memory_gb is None else kv_memory_gb
        blocks_for_budget(self.config, self.dtype, default_block_size(self.device),
                          self._kv_memory_gb, None)  # check
        self.pool: BlockPool | None = None  # the paged pool and runner, made at the first open
        self.runner: PagedRunner | None = None
        self._paged_lock = threading.RLock()

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str],
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, fast_path: bool = True,
                        use_cuda_graphs: bool | None = None,
                        kv_memory_gb: float | None = None,
                        check_finite: bool = True) -> StreamGuard:
        """Load a checkpoint directory or Hugging Face repo id (default: bf16 on CUDA, fp32 on
        CPU); `check_finite`: refuse weights holding NaN/Inf (one pass over them at load); the
        other options are the constructor's."""
        directory = resolve_checkpoint(path_or_id)
        config = GuardConfig.from_json(directory / "config.json")
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_model(directory, config, target, dtype or default_dtype(target),
                           check_finite)
        return cls(model, load_tokenizer(directory), fast_path=fast_path,
                   use_cuda_graphs=use_cuda_graphs, kv_memory_gb=kv_memory_gb)

    # ---- sessions ---------------------------------------------------------------------------
    def open_stream(self) -> StreamState:
        """A new, empty session (it holds no KV blocks until fed)."""
        pool = self.paged_runtime()[0]
        table = BlockTable(pool.block_size)
        state = StreamState(cache=table, owner=self)
        # A session dropped without close_stream still gives its blocks back.
        state.release = weakref.finalize(state, self._release, table)
        return state

    def close_stream(self, state: StreamState) -> None:
        """Free the session's memory; using it again raises StreamClosedError."""
        self._check_owner(state)
        if state.release is not None:
            state.release()
        state.cache = None
        state.last_verdicts = None

    def paged_runtime(self) -> tuple[BlockPool, PagedRunner | None]:
        """The sessions' KV pool and the fast path's runner (None on the reference path), made
        (and on CUDA its graphs captured) once, at the first open_stream."""
        with self._paged_lock:
            if self.pool is None:
                pool = BlockPool.for_budget(self.config, default_block_size(self.device),
                                            self.device, self.dtype,
                                            self._kv_memory_gb)
                if self.fast is not None:
                    heads = {"user": self.model.query, "assistant": self.model.response}
                    self.runner = PagedRunner(self.fast, GuardScores(heads), pool,
                                              use_graphs=self._use_cuda_graphs)
                self.pool = pool
            return self.pool, self.runner

    def _release(self, table: BlockTable) -> None:
        with self._paged_lock:
            assert self.pool is not None
            table.shrink(self.pool, 0)

    def rollback(self, state: StreamState, length: int) -> None:
        """Keep only the first `length` tokens of the session (the kept part is not recomputed)."""
        self._check_open(state)
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"rollback length must be an int, got {length!r}")
        if not 0 <= length <= state.length:
            raise ValueError(
                f"cannot roll back to length {length}: the session holds {state.length} tokens"
            )
        assert state.cache is not None
        with self._paged_lock:
            assert self.pool is not None
            state.cache.shrink(self.pool, length)
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
        check_role(role)
        ids = validate_token_ids(token_ids, self.config.vocab_size)
        start, new = state.length, ids.shape[0]
        limit = self.config.max_position_embeddings
        if start + new > limit:
            raise ValueError(
                f"feeding {new} tokens to a session of {start} would exceed "
                f"max_position_embeddings={limit}"
            )
        assert state.cache is not None
        probs = self._step(state.cache, start, ids, role)
        risk_probs, category_probs = probs
        verdicts = build_verdicts(self.config, role, start, ids, risk_probs, category_probs,
                                  checked=isinstance(probs, Probs) and probs.finite)
        state.token_ids.extend(verdicts.token_ids)
        state.last_verdicts = verdicts
        if state.monitor is None and (self.hooks or self.policy_factory is not None):
            factory = self.policy_factory
            state.monitor = Monitor(policy=factory() if factory is not None else None)
        if state.monitor is not None:  # after the state update, outside the forward
            dispatch(state.monitor, state.id, verdicts, self.hooks)
        return verdicts

    def _step(self, table: BlockTable, start: int, ids: torch.Tensor, role: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One session's chunk: through the paged runner as a batch of one, or (reference path)
        the module-by-module model reading and writing the same pool."""
        with self._paged_lock:
            pool, runner = self.paged_runtime()
            table.grow(pool, start + ids.shape[0])  # PoolExhaustedError leaves it as it was
            try:
                if runner is not None:
                    return runner.forward([Chunk(table, start, ids, role)])[0]
                views = [LayerView(pool, layer, table)
                         for layer in range(self.config.num_hidden_layers)]
                hidden = self.model.model(ids.to(self.device), views, start)
                return self.model.head(role)(hidden)
            except BaseException:
                table.shrink(pool, start)
                raise

    def _check_open(self, state: StreamState) -> None:
        self._check_owner(state)
        state.check_open()

    def _check_owner(self, state: StreamState) -> None:
        if not isinstance(state, StreamState):
            raise TypeError(f"expected a StreamState, got {type(state).__name__}")
        if state.owner is not self:
            raise ForeignSessionError(
                f"stream {state.id} was opened by another StreamGuard; a session can only be "
                f"used with the guard whose open_stream made it")

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
        """Score a templated conversation in a fresh session: prompt verdict at the last user
        turn's <|im_end|>, per-token response verdicts over the span the official evaluation
        scores, and the official response decision (see qguard_stream.conversation)."""
        plan = plan_conversation(self.tokenizer, messages, thinking)
        state = self.open_stream()
        try:
            prompt = self.moderate(state, plan.prompt_ids, "user")
            rest = plan.rest_ids
            after = self.moderate(state, rest, "assistant") if rest is not None else None
        finally:
            self.close_stream(state)
        return plan.verdict(prompt, after)
