"""TextStreamGuard: moderate a response that arrives as text deltas from any LLM.

The deltas (OpenAI-style SSE chunks, bytes, anything) are re-tokenized with the guard's Qwen3
tokenizer by IncrementalTokenizer; only ids that no later text can change are scored, with the
response heads, one moderate() call per delta; the held-back tail is scored by flush()/close().
The ids scored therefore equal `tokenizer(full_text)`, and so do the verdicts. This module does not
decide (policies) or notify (hooks); it only turns text into verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qguard_stream.integrations.retokenize import Delta, IncrementalTokenizer
from qguard_stream.stream import StreamGuard, StreamState
from qguard_stream.template import prompt_spans
from qguard_stream.verdicts import StreamClosedError, Verdicts

Prompt = str | list[dict[str, str]] | Sequence[int]


class TextStreamGuard:
    """One guarded response: an open session fed with the stable tokens of streamed text.

    `prompt` may be a user message (str), chat messages ending with a user turn (rendered with the
    chat template, enable_thinking=False, plus the generation prompt), or token ids fed as-is with
    role "user". The response text is tokenized on its own, as a Qwen3 generator would emit it.
    """

    def __init__(self, guard: StreamGuard, prompt: Prompt | None = None,
                 tokenizer: Any = None) -> None:
        tokenizer = tokenizer if tokenizer is not None else guard.tokenizer
        if tokenizer is None:
            raise ValueError("the guard has no tokenizer: pass tokenizer=")
        self.guard = guard
        self._retokenizer = IncrementalTokenizer(tokenizer)
        user_ids, header_ids = prompt_token_ids(tokenizer, prompt)
        self.state: StreamState = guard.open_stream()
        self._response_ids: list[int] = []
        self.prompt_verdicts: Verdicts | None = None
        try:
            if user_ids:
                self.prompt_verdicts = guard.moderate(self.state, user_ids, "user")
            if header_ids:
                guard.moderate(self.state, header_ids, "assistant")
        except Exception:
            guard.close_stream(self.state)
            raise
        self.response_start = self.state.length

    @property
    def token_ids(self) -> list[int]:
        """Response ids scored so far (a copy)."""
        return list(self._response_ids)

    @property
    def pending_text(self) -> str:
        """Response text received but held back because its tokens may still change."""
        return self._retokenizer.pending_text

    def feed(self, delta: Delta) -> Verdicts | None:
        """Add a text delta; score the ids it made final. None when all of it is held back."""
        self._check_in_step()
        snapshot = self._retokenizer.snapshot()
        return self._score(self._retokenizer.push(delta), snapshot)

    def flush(self) -> Verdicts | None:
        """End of the response text: score the held-back tail. Later feeds start a new text."""
        self._check_in_step()
        snapshot = self._retokenizer.snapshot()
        return self._score(self._retokenizer.flush(), snapshot)

    def rollback(self, tokens: int) -> str:
        """Keep the first `tokens` response tokens (as a generator that resamples from there);
        the held-back text is dropped and returned. Text fed next continues after them."""
        self._check_open()
        if isinstance(tokens, bool) or not isinstance(tokens, int) or \
                not 0 <= tokens <= len(self._response_ids):
            raise ValueError(f"cannot roll back to {tokens!r} response tokens: "
                             f"{len(self._response_ids)} are scored")
        self.guard.rollback(self.state, self.response_start + tokens)
        del self._response_ids[tokens:]
        return self._retokenizer.reset()

    def close(self) -> Verdicts | None:
        """Flush, then free the session. Returns the tail's verdicts (None when there was none)."""
        try:
            return self.flush()
        finally:
            self.guard.close_stream(self.state)

    def __enter__(self) -> TextStreamGuard:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.guard.close_stream(self.state)

    def _score(self, ids: list[int], snapshot: Any) -> Verdicts | None:
        if not ids:
            return None
        before = self.state.length
        try:
            verdicts = self.guard.moderate(self.state, ids, "assistant")
        except Exception:
            if self.state.length == before:  # nothing scored: the text stays pending
                self._retokenizer.restore(snapshot)
            else:  # scored, then a callback raised: the ids are the session's now
                self._response_ids.extend(ids)
            raise
        self._response_ids.extend(ids)
        return verdicts

    def _check_open(self) -> None:
        if self.state.closed:
            raise StreamClosedError(f"text stream {self.state.id} is closed; open a new one")

    def _check_in_step(self) -> None:
        """Open, and the session's length is the prompt plus our response ids."""
        self._check_open()
        scored = self.response_start + len(self._response_ids)
        if self.state.length != scored:  # the session was rolled back with guard.rollback
            if self.state.length < self.response_start:
                raise ValueError(
                    f"the session was rolled back into the prompt (to {self.state.length} < "
                    f"{self.response_start}); use TextStreamGuard.rollback, or open a new one")
            self.rollback(self.state.length - self.response_start)  # back in step


def prompt_token_ids(tokenizer: Any, prompt: Prompt | None) -> tuple[list[int], list[int]]:
    """(ids scored with the query heads, assistant-header ids scored with the response heads)."""
    if prompt is None:
        return [], []
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        return prompt_spans(tokenizer, prompt)
    ids = list(prompt)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"prompt must be a str, chat messages or a non-empty list of token ids, "
                         f"got {prompt!r}")
    return ids, []
