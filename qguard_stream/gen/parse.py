"""Parse Qwen3Guard-Gen's verdict text (`Safety: ...`, `Categories: ...`, `Refusal: ...`).

Strict about content (known labels and categories only, each field once, Refusal only for
responses), tolerant of layout (spaces around keys, values and commas; blank lines; field order).
Text that does not fit is returned as unparseable with the reason, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

SAFETY_LABELS: tuple[str, ...] = ("Safe", "Unsafe", "Controversial")
GEN_CATEGORIES: tuple[str, ...] = (
    "Violent",
    "Non-violent Illegal Acts",
    "Sexual Content or Sexual Acts",
    "PII",
    "Suicide & Self-Harm",
    "Unethical Acts",
    "Politically Sensitive Topics",
    "Copyright Violation",
    "Jailbreak",  # prompts only
)
KINDS = ("prompt", "response")
_REFUSAL = {"Yes": True, "No": False}


@dataclass(frozen=True)
class GenVerdict:
    """One Gen moderation result. `safety` is None exactly when the text could not be parsed."""

    kind: str  # "prompt" or "response"
    safety: str | None
    categories: tuple[str, ...]
    refusal: bool | None  # responses only
    raw_text: str
    error: str | None = None  # why the text is unparseable

    @property
    def parsed(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "safety": self.safety, "categories": list(self.categories),
                "refusal": self.refusal, "raw_text": self.raw_text, "error": self.error}


class _Unparseable(ValueError):
    pass


def parse_gen_output(text: str, kind: str) -> GenVerdict:
    """Parse the generated text of a prompt ("prompt") or response ("response") moderation."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    try:
        fields = _fields(text)
        safety = _safety(fields)
        categories = _categories(fields, kind)
        refusal = _refusal(fields, kind)
    except _Unparseable as err:
        return GenVerdict(kind, None, (), None, text, str(err))
    return GenVerdict(kind, safety, categories, refusal, text)


def _fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        key = key.strip()
        if not colon or key not in ("Safety", "Categories", "Refusal"):
            raise _Unparseable(f"unexpected line {line.strip()!r}")
        if key in fields:
            raise _Unparseable(f"field {key!r} appears more than once")
        fields[key] = value.strip()
    return fields


def _safety(fields: dict[str, str]) -> str:
    if "Safety" not in fields:
        raise _Unparseable("no 'Safety:' line")
    if fields["Safety"] not in SAFETY_LABELS:
        raise _Unparseable(f"unknown safety label {fields['Safety']!r}")
    return fields["Safety"]


def _categories(fields: dict[str, str], kind: str) -> tuple[str, ...]:
    if "Categories" not in fields:
        raise _Unparseable("no 'Categories:' line")
    names = [name.strip() for name in fields["Categories"].split(",")]
    if names == ["None"]:
        return ()
    allowed = GEN_CATEGORIES if kind == "prompt" else GEN_CATEGORIES[:-1]
    for name in names:
        if name not in allowed:
            raise _Unparseable(f"unknown {kind} category {name!r}")
    if len(set(names)) != len(names):
        raise _Unparseable(f"repeated category in {fields['Categories']!r}")
    return tuple(names)


def _refusal(fields: dict[str, str], kind: str) -> bool | None:
    if kind == "prompt":
        if "Refusal" in fields:
            raise _Unparseable("'Refusal:' is only expected when moderating a response")
        return None
    if "Refusal" not in fields:
        raise _Unparseable("no 'Refusal:' line in a response moderation")
    if fields["Refusal"] not in _REFUSAL:
        raise _Unparseable(f"refusal must be Yes or No, got {fields['Refusal']!r}")
    return _REFUSAL[fields["Refusal"]]
