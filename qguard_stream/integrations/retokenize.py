"""Incremental re-tokenization of streamed text with the Qwen3 (byte-level BPE) tokenizer.

`IncrementalTokenizer.push(delta)` returns only ids that no continuation of the text can change;
`flush()` returns the rest. Everything returned, concatenated, equals
`tokenizer(full_text, add_special_tokens=False)["input_ids"]`. The way back, ids to text, is
`TokenText` (each id's bytes through one UTF-8 decoder), and `HeldText` releases the text of scored
ids only once `holdback` later ids were scored (what a guarded stream may show its reader).

Why a cut is final. The tokenizer runs four stages; a cut c in the pending text is accepted only
where every stage splits there whatever text comes later:
1. added tokens ("<|im_end|>", ...) are matched on the raw text, leftmost-longest: no added token
may
   start before c and be unfinished at c, so no text ending at c is a proper prefix of one;
2. NFC normalization: the character at c must be a starter that nothing composes with backwards;
3. the split regex (GPT-2 style, see PRE_TOKENIZER_PATTERN): the match [p, end) only reads text up
   to index max(end, first non-space at or after p) (a greedy run reads the character that ends it;
   `\\s+(?!\\S)` and `\\s*[\\r\\n]+` read past a whole whitespace run); every piece left of c
   must have read only text already known and final;
4. BPE runs within one piece, so pieces that are final give final ids.
The window kept is the text after the last cut, so each push costs O(window), not O(history).
This module owns no model and no session; it never changes the ids a one-shot call would give.
"""

from __future__ import annotations

import codecs
import functools
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

PRE_TOKENIZER_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Superset of what the regex engine may call \s: reading too far is safe, too short is not.
_EXTRA_SPACES = frozenset("\u180e\u200b\u2060\ufeff")
_SURROGATE = re.compile("[\ud800-\udfff]")
Delta = str | bytes | bytearray | memoryview


RELEASE_GIL_CHARS = 4096


class UnsupportedTokenizerError(ValueError):
    """The tokenizer's pipeline is not the one whose stability this module can prove."""


@dataclass(frozen=True)
class AddedTokens:
    """Added tokens matched on raw text (leftmost-longest), and all their proper prefixes."""

    pattern: re.Pattern[str] | None
    proper_prefixes: frozenset[str]
    first_chars: frozenset[str]
    longest: int

    @classmethod
    def from_contents(cls, contents: list[str]) -> AddedTokens:
        ordered = sorted(set(contents), key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        prefixes = frozenset(c[:k] for c in ordered for k in range(1, len(c)))
        firsts = frozenset(c[0] for c in ordered)
        return cls(pattern, prefixes, firsts, max(map(len, ordered), default=0))

    def last_match(self, text: str) -> tuple[int, int] | None:
        """(start, end) of the last added token in `text`, or None."""
        if self.pattern is None:
            return None
        last = None
        for match in self.pattern.finditer(text):
            last = match.span()
        return last

    def unfinished_at(self, text: str, cut: int) -> bool:
        """True when some text[p:cut] (p < cut) could still grow into an added token."""
        first = max(0, cut - self.longest + 1)
        return any(text[p] in self.first_chars and text[p:cut] in self.proper_prefixes
                   for p in range(first, cut))


@functools.cache
def _backward_composers() -> frozenset[str]:
    """Characters NFC may compose with the character before them."""
    seconds = set()
    for code in range(0x30000):
        decomposition = unicodedata.decomposition(chr(code))
        parts = decomposition.split()
        if len(parts) == 2 and not decomposition.startswith("<"):
            seconds.add(chr(int(parts[1], 16)))
    seconds.update(map(chr, range(0x1161, 0x1176)))  # Hangul vowels compose algorithmically
    seconds.update(map(chr, range(0x11A8, 0x11C3)))  # Hangul trailing consonants
    return frozenset(seconds)


@functools.lru_cache(maxsize=65536)
def is_safe_starter(char: str) -> bool:
    """True when NFC never joins `char` to the text before it (so NFC splits before it).

    Unassigned characters count as unsafe: the tokenizer's Unicode tables may be newer."""
    if char < "\x80":
        return True
    if unicodedata.category(char) == "Cn" or unicodedata.combining(char) != 0:
        return False
    if unicodedata.combining(unicodedata.normalize("NFD", char)[0]) != 0:
        return False
    return char not in _backward_composers()


def _is_space(char: str) -> bool:
    return char.isspace() or char in _EXTRA_SPACES


def check_supported(tokenizer: Any) -> Any:
    """Return the tokenizer's `tokenizers` backend, or raise if its pipeline is not Qwen2/3's."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizerError(
            f"{type(tokenizer).__name__} has no backend_tokenizer: a fast (tokenizers) tokenizer "
            "is required")
    normalizer = _component_spec(backend.normalizer)
    if normalizer not in (None, {"type": "NFC"}):
        raise UnsupportedTokenizerError(f"normalizer {normalizer!r} is not NFC")
    pre_tokenizer = _component_spec(backend.pre_tokenizer)
    if _split_regex(pre_tokenizer) != PRE_TOKENIZER_PATTERN:
        raise UnsupportedTokenizerError(
            f"pre-tokenizer {pre_tokenizer!r} is not the Qwen2/Qwen3 split followed by ByteLevel")
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        flags = [k for k in ("lstrip", "rstrip", "single_word", "normalized") if getattr(token, k)]
        if flags:
            raise UnsupportedTokenizerError(
                f"added token {token.content!r} sets {flags}: only plain added tokens supported")
    return backend


def _component_spec(component: Any) -> dict[str, Any] | None:
    return None if component is None else json.loads(component.__getstate__())


def _split_regex(spec: dict[str, Any] | None) -> str | None:
    """The regex of a Sequence[Split(Isolated), ByteLevel(use_regex=False)] pre-tokenizer."""
    steps = (spec or {}).get("pretokenizers", [])
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        return None
    if steps[0].get("behavior") != "Isolated" or steps[0].get("invert") or \
            steps[1].get("use_regex") or steps[1].get("add_prefix_space"):
        return None
    return steps[0].get("pattern", {}).get("Regex")


class IncrementalTokenizer:
    """Turns text deltas (str, or UTF-8 bytes split anywhere) into final token ids."""

    def __init__(self, tokenizer: Any) -> None:
        backend = check_supported(tokenizer)
        self._tokenizer = tokenizer
        self._backend = backend
        self._normalize = backend.normalizer.normalize_str if backend.normalizer else str
        self._pre_tokenize = backend.pre_tokenizer.pre_tokenize_str
        self._added = AddedTokens.from_contents(list(tokenizer.get_added_vocab()))
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._window = ""

    @property
    def pending_text(self) -> str:
        """Text received but not yet turned into ids (held back because it may still change)."""
        return self._window

    @property
    def pending_bytes(self) -> bytes:
        """Bytes of an incomplete UTF-8 character received so far."""
        return self._decoder.getstate()[0]

    def snapshot(self) -> tuple[str, tuple[bytes, int]]:
        """Opaque state for `restore` (lets a caller undo a push whose ids it could not use)."""
        return self._window, self._decoder.getstate()

    def restore(self, snapshot: tuple[str, tuple[bytes, int]]) -> None:
        self._window = snapshot[0]
        self._decoder.setstate(snapshot[1])

    def reset(self) -> str:
        """Drop the held-back text (and any partial UTF-8 character); return the text dropped."""
        dropped = self._window
        self._window = ""
        self._decoder.reset()
        return dropped

    def push(self, delta: Delta) -> list[int]:
        """Append a delta; return the ids that became final (possibly none)."""
        self._window += self._decode(delta)
        cut = self._stable_cut(self._window)
        if cut == 0:
            return []
        ids = self._encode(self._window[:cut])
        self._window = self._window[cut:]
        return ids

    def flush(self) -> list[int]:
        """End of text: return the ids of everything still held back and reset."""
        try:
            self._window += self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise ValueError(f"text ends inside a UTF-8 character: {self.pending_bytes!r} "
                             "left over") from error
        ids = self._encode(self._window) if self._window else []
        self._window = ""
        return ids

    # ---- input -------------------------------------------------------------------------------
    def _decode(self, delta: Delta) -> str:
        if isinstance(delta, (bytes, bytearray, memoryview)):
            state = self._decoder.getstate()
            try:
                return self._decoder.decode(bytes(delta))
            except UnicodeDecodeError as error:
                self._decoder.setstate(state)
                raise ValueError(f"delta {bytes(delta)!r} is not valid UTF-8 after "
                                 f"{state[0]!r}: {error.reason}") from error
        if not isinstance(delta, str):
            raise TypeError(f"delta must be str or bytes, got {type(delta).__name__}")
        if self.pending_bytes:
            raise ValueError(f"str delta {delta!r} arrived inside a UTF-8 character "
                             f"(pending bytes {self.pending_bytes!r})")
        surrogate = _SURROGATE.search(delta)
        if surrogate:
            raise ValueError(f"delta {delta!r} holds a lone surrogate "
                             f"{surrogate.group()!r} at {surrogate.start()}")
        return delta

    def _encode(self, text: str) -> list[int]:
        backend = self._backend
        if backend.truncation is None and backend.padding is None and \
                not backend.encode_special_tokens:
            if len(text) >= RELEASE_GIL_CHARS:  # encode_batch runs without the GIL, so a long
                # text tokenized in a worker thread does not stall the caller's event loop
                return backend.encode_batch([text], add_special_tokens=False)[0].ids
            return backend.encode(text, add_special_tokens=False).ids  # same ids, less overhead
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- where text is final -----------------------------------------------------------------
    def _stable_cut(self, text: str) -> int:
        """The largest index c such that ids(text[:c]) are final (0: nothing is)."""
        match = self._added.last_match(text)
        segment_start = match[1] if match else 0
        cut = self._cut_in_segment(text, segment_start)
        if cut is not None:
            return cut
        if not self._added.unfinished_at(text, segment_start):
            return segment_start
        if match and not self._added.unfinished_at(text, match[0]):
            return match[0]
        return 0

    def _cut_in_segment(self, text: str, start: int) -> int | None:
        """The largest final cut strictly inside the last plain segment text[start:], if any."""
        offsets = self._normalized_offsets(text, start)
        positions = list(reversed(offsets))
        # text[start:limit] normalizes to a final string: no added token can begin before limit
        limit = next((c for c in positions if not self._added.unfinished_at(text, c)), None)
        if limit is None:
            return None
        known = self._normalize(text[start:limit])
        if len(known) != offsets[limit]:
            return None  # the normalizer disagrees with our table of safe starters
        pieces = self._pre_tokenize(known)
        final = _final_piece_ends(known, pieces)
        for cut in positions:
            count = final.get(offsets[cut]) if cut < limit else None
            if count and not self._added.unfinished_at(text, cut) and \
                    self._splits_as(text[start:cut], known[: offsets[cut]], pieces[:count]):
                return cut
        return None

    def _splits_as(self, raw: str, normalized: str, pieces: list[tuple[str, Any]]) -> bool:
        """Check that `raw` alone normalizes and pre-tokenizes into exactly `pieces`."""
        head = self._normalize(raw)
        return head == normalized and self._pieces(head) == [piece for piece, _ in pieces]

    def _normalized_offsets(self, text: str, start: int) -> dict[int, int]:
        """Raw index -> offset in the normalized segment, for each safe starter after `start`."""
        if text.isascii():
            return {i: i - start for i in range(start + 1, len(text))}
        offsets: dict[int, int] = {}
        previous, length = start, 0
        for i in range(start + 1, len(text)):
            if is_safe_starter(text[i]):
                length += len(self._normalize(text[previous:i]))
                offsets[i], previous = length, i
        return offsets

    def _pieces(self, text: str) -> list[str]:
        return [piece for piece, _ in self._pre_tokenize(text)]


def _final_piece_ends(known: str, pieces: list[tuple[str, tuple[int, int]]]) -> dict[int, int]:
    """Piece ends in `known` that no later text can move -> how many pieces lie before them."""
    next_non_space = _next_non_space(known)
    final: dict[int, int] = {}
    for count, (_, (begin, end)) in enumerate(pieces, start=1):
        # A contraction alternative reads text[begin + 2] only after "'r", "'v" or "'l"; then
        # either it matched (end > begin + 2) or the letters alternative read as far (end >= it).
        if max(end, next_non_space[begin]) >= len(known):
            break  # this piece's match read text that is not known yet
        final[end] = count
    return final


def _next_non_space(text: str) -> list[int]:
    """For each index, the first index >= it whose character is not whitespace (len if none)."""
    result = [len(text)] * (len(text) + 1)
    for i in range(len(text) - 1, -1, -1):
        result[i] = result[i + 1] if _is_space(text[i]) else i
    return result


class TokenText:
    """Token ids -> text, incrementally: each id's bytes (byte-level BPE; added tokens by their
    content) through one UTF-8 decoder, so a character split over tokens comes out whole. Qwen3's
    byte-level BPE round-trips text exactly, up to the tokenizer's NFC normalization."""

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


class HeldText:
    """The text of scored ids, released only once `holdback` later ids were scored.

    With the official rule (two consecutive Unsafe tokens flag) and holdback 2, no token of a
    flagged run is ever released: when a stop decision arrives, the text before its run is
    released and everything from the run on is withheld for good.
    """

    def __init__(self, token_text: TokenText, holdback: int) -> None:
        if isinstance(holdback, bool) or not isinstance(holdback, int) or holdback < 0:
            raise ValueError(f"holdback must be an int >= 0, got {holdback!r}")
        self.token_text, self.holdback = token_text, holdback
        self.utf8 = token_text.decoder()
        self.ids: list[int] = []  # scored, not yet released
        self.end = 0  # the position after the last held id
        self.stopped = False

    def add(self, ids: list[int], end: int) -> None:
        """Hold `ids`, scored at positions end - len(ids) .. end - 1."""
        if not self.stopped:
            self.ids += ids
        self.end = end

    def release(self, stop_start: int | None = None, final: bool = False) -> str:
        """The text now safe to show: all held ids if `final`, else all but the last `holdback`;
        with a stop decision whose flagged run starts at position `stop_start`, only the ids
        before it (and nothing ever after)."""
        if self.stopped:
            return ""
        if stop_start is not None:
            count, final, self.stopped = stop_start - (self.end - len(self.ids)), True, True
        else:
            count = len(self.ids) if final else len(self.ids) - self.holdback
        count = max(0, min(count, len(self.ids)))
        released = self.ids[:count]
        self.ids = [] if self.stopped else self.ids[count:]
        data = b"".join(self.token_text.bytes_of(token) for token in released)
        return self.utf8.decode(data, final=final) if data or final else ""

    def truncate(self, length: int) -> None:
        """Follow a rollback to `length` positions: held ids at or past it are dropped (released
        text stays released); a stop made past `length` is undone."""
        first = self.end - len(self.ids)
        self.ids = self.ids[:max(0, length - first)]
        self.end = min(self.end, length)
        self.stopped = False
        self.utf8.reset()


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
