"""The proxy's per-request guarding: a prompt check and one guarded response per choice.

A response arrives as text deltas. Each delta is re-tokenized incrementally (IncrementalTokenizer:
the ids equal the tokenization of the whole text), the ids that became final are scored on the
choice's engine session, and the policy (a Monitor) judges them. Text is released to the client
only for tokens followed by `holdback` scored tokens, so with the official rule (two consecutive
Unsafe tokens) and holdback 2 no token of a flagged run is ever released. Released text is the
tokens' bytes decoded incrementally (Qwen3's byte-level BPE round-trips text exactly, up to the
tokenizer's NFC normalization). This module knows nothing of HTTP or SSE (app.py).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

from qguard_stream.engine import AsyncEngine, Session
from qguard_stream.hooks import Monitor, token_verdicts
from qguard_stream.integrations.retokenize import IncrementalTokenizer
from qguard_stream.policy import (
    CONTROVERSIAL,
    UNSAFE,
    ConsecutiveUnsafe,
    Decision,
    Policy,
    ProbabilityThreshold,
)
from qguard_stream.template import prompt_spans
from qguard_stream.verdicts import Verdicts

POLICIES = "official | strict | threshold:P (0 < P <= 1)"


@dataclass(frozen=True)
class GuardPolicy:
    """A named decision policy: how prompts and responses are judged."""

    name: str
    strict: bool = False
    threshold: float | None = None

    @classmethod
    def parse(cls, text: str) -> GuardPolicy:
        """'official' (Unsafe flags; the official rule), 'strict' (Controversial flags too) or
        'threshold:P' (P(Unsafe) >= P flags); ValueError naming the text otherwise."""
        value = (text or "").strip().lower()
        if value in ("official", "strict"):
            return cls(value, strict=value == "strict")
        if value.startswith("threshold:"):
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


def text_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages as the chat template takes them: string contents (text parts of a
    list content joined), system/user/assistant roles; ValueError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object, got {message!r:.60}")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{index}].role {role!r} cannot be moderated "
                             f"(system, user and assistant can)")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content
                              if isinstance(part, dict) and part.get("type") == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string or text parts")
        out.append({"role": role, "content": content})
    return out


class TokenText:
    """Token ids -> text, incrementally: each id's bytes (byte-level BPE; added tokens by their
    content) through one UTF-8 decoder, so a character split over tokens comes out whole."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
        self.added = {index: token.content
                      for index, token in tokenizer.added_tokens_decoder.items()}
        self.cache: dict[int, bytes] = {}

    def decoder(self) -> codecs.IncrementalDecoder:
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    def bytes_of(self, token_id: int) -> bytes:
        cached = self.cache.get(token_id)
        if cached is None:
            if token_id in self.added:
                cached = self.added[token_id].encode()
            else:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                cached = bytes(self.byte_of[char] for char in piece)
            self.cache[token_id] = cached
        return cached


class ResponseGuard:
    """One choice's response on its own engine session: text deltas in, released text out."""

    def __init__(self, engine: AsyncEngine, session: Session, tokenizer: Any,
                 token_text: TokenText, policy: Policy, holdback: int) -> None:
        self.engine, self.session, self.holdback = engine, session, holdback
        self.retokenizer = IncrementalTokenizer(tokenizer)
        self.token_text = token_text
        self.utf8 = token_text.decoder()
        self.monitor = Monitor(policy=policy, policy_start=session.length)
        self.held: list[int] = []  # scored ids not yet released
        self.tokens_scored = 0

    @property
    def decision(self) -> Decision | None:
        """The policy's stop decision, once made (then nothing more is released)."""
        return self.monitor.stop_decision

    async def push(self, delta: str) -> str:
        """Score the ids this delta made final; return the text now safe to release."""
        return await self._score(self.retokenizer.push(delta), final=False)

    async def finish(self) -> str:
        """End of the response: score the held-back tail and release what is left."""
        return await self._score(self.retokenizer.flush(), final=True)

    async def _score(self, ids: list[int], final: bool) -> str:
        if self.decision is not None:  # decided earlier: nothing more is released
            return ""
        if ids:
            verdicts = await self.engine.moderate(self.session, ids, "assistant")
            self.monitor.record(self.session.id, token_verdicts(verdicts))
            self.tokens_scored += len(ids)
            self.held += ids
        decision = self.decision
        if decision is not None:  # release what precedes the flagged run, withhold the rest
            first_held = self.session.length - len(self.held)
            count, final = decision.start_position - first_held, True
        else:
            count = len(self.held) if final else len(self.held) - self.holdback
        if count <= 0:
            self.held = [] if decision is not None else self.held
            return ""
        released, self.held = self.held[:count], ([] if decision is not None
                                                   else self.held[count:])
        data = b"".join(self.token_text.bytes_of(token) for token in released)
        return self.utf8.decode(data, final=final)


async def open_prompt(engine: AsyncEngine, tokenizer: Any, messages: list[dict[str, str]]
                      ) -> tuple[Session, Verdicts, list[int]]:
    """A session holding the prompt scored with the query heads (the verdict is the last one),
    and the assistant-header ids to feed before the response."""
    user_ids, header_ids = prompt_spans(tokenizer, messages)
    session = await engine.open()
    try:
        verdicts = await engine.moderate(session, user_ids, "user")
    except BaseException:
        await engine.close(session)
        raise
    return session, verdicts, header_ids


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table, which byte-level BPE tokens are spelt in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))
