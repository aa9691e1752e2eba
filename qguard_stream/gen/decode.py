"""Decoding for the causal LM on the paged runner: many sequences, continuously batched.

Every sequence is a block table into one paged pool (kvcache/paged.py), and every step is one step
of the paged runner (runtime/paged.py, the runner StreamGuard and the engine use) returning the
next-token logits after each sequence's last row (outputs.NextTokenLogits). Requests are submitted
at any time (`Decoder.submit`) to one decoding loop on its own thread: a request joins the running
batch between steps when the pool has blocks for its prompt plus its token budget (reserved when
it joins, so decoding never runs out of blocks mid-way), is prefilled in the step it joins, and
leaves the batch when it stops, is cancelled or fails; the others keep decoding. Each sequence
decodes as it would alone, up to the float rounding of batched GEMMs. Greedy by default (the Gen
model is a classifier that writes its verdict); `Sampling` adds temperature / top-p with a
per-request seeded generator.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qguard_stream.gen.causal_lm import CausalLM
from qguard_stream.kvcache.paged import (
    BlockPool,
    BlockTable,
    PoolTooSmallError,
    blocks_for_budget,
    default_block_size,
    default_kv_gb,
)
from qguard_stream.runtime.outputs import NextTokenLogits
from qguard_stream.runtime.paged import Chunk, PagedRunner
from qguard_stream.runtime.weights import FusedWeights

MAX_STEP_TOKENS = 4096  # prompt tokens prefilled in one step (sequences past it join next step)
CANCEL_WAIT_S = 30.0  # generate() waits this long for cancelled sequences to free their blocks


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy when temperature is 0, else sampled from the
    softmax at `temperature`, restricted to the smallest set of tokens whose probability reaches
    `top_p`, with a generator seeded by `seed` (random when None)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


GREEDY = Sampling()


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` (one row) with every token outside the nucleus zeroed, not renormalised: the
    nucleus is the smallest set of most probable tokens whose probability reaches `top_p`
    (OpenAI's and vLLM's top_p), so it always holds the top token."""
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(0) - ordered  # mass of the tokens ranked above each
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, ordered)


def pick_token(logits: torch.Tensor, sampling: Sampling,
               generator: torch.Generator | None = None) -> int:
    """The next token from one row of logits: the argmax when greedy, else drawn with
    `generator` from softmax(logits / temperature) cut to the top_p nucleus."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        probs = top_p_filter(probs, sampling.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


# (sequences, tokens fed to the model, seconds) of a step; each sequence gains one token a step
StepListener = Callable[[int, int, float], None]
TokenListener = Callable[["GenRequest", "int | None"], None]  # a token; None: it ended


class GenRequest:
    """One submitted sequence: its generated ids so far, and how it ended. `on_token(request,
    token_id)` is called on the decoding thread after each token, and `on_token(request, None)`
    once it has ended (finish_reason set); `wait()` blocks until done."""

    def __init__(self, prompt: torch.Tensor, limit: int, stop_ids: frozenset[int],
                 sampling: Sampling, on_token: TokenListener | None,
                 block_size: int) -> None:
        self.prompt, self.limit, self.stop_ids = prompt, limit, stop_ids
        self.sampling, self.on_token = sampling, on_token
        self.table = BlockTable(block_size)
        self.generated: list[int] = []
        self.finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
        self.error: BaseException | None = None
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None  # when it joined the batch
        self.cancelled = False
        self.done = threading.Event()
        self.generator: torch.Generator | None = None

    @property
    def length(self) -> int:
        return self.prompt.shape[0] + len(self.generated)

    def cancel(self) -> None:
        """Stop decoding it (its blocks are freed at the next step); harmless once done."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> list[int]:
        """The generated ids (ending with the stop id when one was produced); raises what
        failed the step that decoded it."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"decoding did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.generated


class Decoder:
    """Decoding of a causal LM over one paged pool of `kv_memory_gb` GiB (default: 2 on CUDA, 4
    on the CPU), made at the first request, by one loop thread that runs while there is work;
    `submit` and `generate` may be called from any thread."""

    def __init__(self, lm: CausalLM, kv_memory_gb: float | None = None,
                 use_cuda_graphs: bool | None = None) -> None:
        self.lm, self.config = lm, lm.config
        weight = lm.model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.kv_memory_gb = default_kv_gb(self.device) if kv_memory_gb is None else kv_memory_gb
        blocks_for_budget(self.config, self.dtype, default_block_size(self.device),
                          self.kv_memory_gb, None)
        self.use_cuda_graphs = use_cuda_graphs
        self.pool: BlockPool | None = None
        self.runner: PagedRunner | None = None
        self.lock = threading.Condition()
        self.waiting: deque[GenRequest] = deque()
        self.thread: threading.Thread | None = None
        self.step_listeners: list[StepListener] = []
        self.max_sequences: int | None = None  # cap on the running batch (None: the pool's)

    def _runtime(self) -> tuple[BlockPool, PagedRunner]:
        if self.pool is None or self.runner is None:
            self.pool = BlockPool.for_budget(self.config, default_block_size(self.device),
                                             self.device, self.dtype,
                                             self.kv_memory_gb)
            weights = FusedWeights(self.lm.model, self.config)
            self.runner = PagedRunner(weights, NextTokenLogits(self.lm.lm_head.weight), self.pool,
                                      use_graphs=self.use_cuda_graphs, max_graph_tokens=64)
        return self.pool, self.runner

    def submit(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: frozenset[int],
               sampling: Sampling = GREEDY,
               on_token: TokenListener | None = None) -> GenRequest:
        """Queue a continuation of `prompt` (at most max_new_tokens, never past
        max_position_embeddings); PoolTooSmallError at once if the pool could never hold it."""
        with self.lock:
            pool, _ = self._runtime()
            limit = self._check_fits(len(prompt), max_new_tokens)
            request = GenRequest(torch.tensor(list(prompt), dtype=torch.int64), limit, stop_ids,
                                 sampling, on_token, pool.block_size)
            if sampling.temperature > 0:
                request.generator = torch.Generator(device=self.device)
                request.generator.manual_seed(sampling.seed if sampling.seed is not None
                                              else int.from_bytes(os.urandom(8), "little") >> 1)
            self.waiting.append(request)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="gen-decoder",
                                               daemon=True)
                self.thread.start()
            self.lock.notify()
        return request

    def _check_fits(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """The length a sequence of this prompt may reach (never past max_position_embeddings),
        or PoolTooSmallError when the pool could never hold it."""
        pool, _ = self._runtime()
        limit = min(prompt_tokens + max_new_tokens, self.config.max_position_embeddings)
        need = -(-limit // pool.block_size)
        if need > pool.num_blocks:
            raise PoolTooSmallError(
                f"a sequence that may reach {limit} tokens needs {need} KV blocks; the pool "
                f"holds {pool.num_blocks} (raise kv_memory_gb)")
        return limit

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: frozenset[int]) -> list[list[int]]:
        """Greedy continuation of every prompt, decoded together; each list ends with its stop
        token when one was produced. Every prompt is checked before any is queued; after an
        error, the blocks of those already queued are back in the pool when this returns."""
        with self.lock:
            for ids in prompts:
                self._check_fits(len(ids), max_new_tokens)
        requests: list[GenRequest] = []
        failed = True
        try:
            for ids in prompts:
                requests.append(self.submit(ids, max_new_tokens, stop_ids))
            results = [request.wait() for request in requests]
            failed = False
            return results
        finally:
            if failed:
                for request in requests:
                    request.cancel()  # no-op for finished ones
                for request in requests:
                    request.done.wait(CANCEL_WAIT_S)  # the loop frees them at its next step

    @torch.inference_mode()
    def _loop(self) -> None:
        pool, runner = self._runtime()
        running: list[GenRequest] = []
        while True:
            with self.lock:
                while not self.waiting and not running:
                    self.lock.wait()
                room = None if self.max_sequences is None else self.max_sequences - len(running)
                joining = self._admit(self.waiting, pool, room)
            running = [r for r in running if not self._ended(r, pool, "cancelled", r.cancelled)]
            joining = [r for r in joining if not self._ended(r, pool, "cancelled", r.cancelled)]
            if not running and not joining:
                if self.waiting:  # nothing fits yet and nothing runs: should not happen
                    time.sleep(0.001)
                continue
            began = time.perf_counter()
            chunks = [Chunk(r.table, r.length - 1, r.prompt.new_tensor(r.generated[-1:]),
                            "assistant") for r in running]
            chunks += [Chunk(r.table, 0, r.prompt, "assistant") for r in joining]
            now = time.monotonic()
            for request in joining:
                request.started_at = now
            batch = running + joining
            try:
                logits = runner.forward(chunks)
                tokens = [self._pick(request, row) for request, row in zip(batch, logits)]
            except Exception as error:  # the step failed: its sequences fail, the loop goes on
                for request in batch:
                    request.error = error
                    self._ended(request, pool, "error", True)
                running = []
                continue
            seconds = time.perf_counter() - began
            # the step is recorded before its tokens go out: whoever sees a token sees its step
            for listener in self.step_listeners:
                listener(len(batch), sum(c.token_ids.shape[0] for c in chunks), seconds)
            running = []
            for request, token in zip(batch, tokens):
                request.generated.append(token)
                if request.on_token is not None:
                    try:
                        request.on_token(request, token)
                    except Exception:  # a listener's failure is the listener's
                        request.cancel()
                if not (self._ended(request, pool, "stop", token in request.stop_ids)
                        or self._ended(request, pool, "length",
                                       request.length >= request.limit)):
                    running.append(request)

    @staticmethod
    def _ended(request: GenRequest, pool: BlockPool, reason: str, ended: bool) -> bool:
        if ended:
            request.finish_reason = reason
            request.table.shrink(pool, 0)
            request.done.set()
            if request.on_token is not None:
                try:
                    request.on_token(request, None)
                except Exception:  # a listener's failure is the listener's
                    pass
        return ended

    @staticmethod
    def _pick(request: GenRequest, row: torch.Tensor) -> int:
        return pick_token(row, request.sampling, request.generator)

    @staticmethod
    def _admit(waiting: deque[GenRequest], pool: BlockPool, room: int | None = None
               ) -> list[GenRequest]:
        """Requests joining this step: in order, while their blocks fit the pool, their prompts
        the step, and (with `room`) their number the batch."""
        joining: list[GenRequest] = []
        tokens = 0
        while waiting and (room is None or len(joining) < room):
            request = waiting[0]
            need = request.table.blocks_needed(request.limit)
            prompt = request.prompt.shape[0]
            if need > pool.free_blocks or (joining and tokens + prompt > MAX_STEP_TOKENS):
                break
            request.table.grow(pool, request.limit)
            joining.append(waiting.popleft())
            tokens += prompt
        return joining
