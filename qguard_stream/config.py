"""GuardConfig: the model's shape and label maps, read once from a checkpoint's config.json.

This module owns every quirk of the on-disk config (rope_theta spelled two ways, label maps with
string keys, missing optional maps). It must not touch weights or devices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

RISK_LEVELS: tuple[str, ...] = ("Safe", "Unsafe", "Controversial")
RESPONSE_CATEGORIES: tuple[str, ...] = (
    "Violent",
    "Sexual Content or Sexual Acts",
    "Suicide & Self-Harm",
    "Politically Sensitive Topics",
    "PII",
    "Copyright Violation",
    "Non-violent Illegal Acts",
    "Unethical Acts",
)
QUERY_CATEGORIES: tuple[str, ...] = (*RESPONSE_CATEGORIES, "Jailbreak")


class ConfigError(ValueError):
    """config.json is missing a field, or its fields contradict each other."""


_REQUIRED: tuple[str, ...] = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "rms_norm_eps",
    "max_position_embeddings",
    "guard_inner_size",
)


@dataclass(frozen=True)
class GuardConfig:
    """Shape of a Qwen3Guard-Stream model plus its label maps (index order of the heads)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    guard_inner_size: int
    response_risk_levels: tuple[str, ...] = RISK_LEVELS
    response_categories: tuple[str, ...] = RESPONSE_CATEGORIES
    query_risk_levels: tuple[str, ...] = RISK_LEVELS
    query_categories: tuple[str, ...] = QUERY_CATEGORIES
    tie_word_embeddings: bool = False
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size",
                     "max_position_embeddings", "guard_inner_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"config field {name!r} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embedding, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"config field 'rms_norm_eps' must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"config field 'rope_theta' must be > 0, got {self.rope_theta!r}")

    @property
    def num_risk_levels(self) -> int:
        return len(self.response_risk_levels)

    @property
    def num_response_categories(self) -> int:
        return len(self.response_categories)

    @property
    def num_query_categories(self) -> int:
        return len(self.query_categories)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GuardConfig:
        """Build from the parsed config.json; raises ConfigError naming the bad field."""
        missing = [name for name in _REQUIRED if name not in raw]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if not isinstance(heads, int) or heads <= 0 or hidden % heads:
                raise ConfigError(
                    f"config.json has no head_dim and hidden_size ({hidden}) is not divisible by "
                    f"num_attention_heads ({heads})"
                )
            head_dim = hidden // heads
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw["num_key_value_heads"],
            head_dim=head_dim,
            intermediate_size=raw["intermediate_size"],
            rms_norm_eps=float(raw["rms_norm_eps"]),
            rope_theta=float(_rope_theta(raw)),
            max_position_embeddings=raw["max_position_embeddings"],
            guard_inner_size=raw["guard_inner_size"],
            response_risk_levels=_labels(raw, "response_risk_level_map", "num_risk_level",
                                         RISK_LEVELS),
            response_categories=_labels(raw, "response_category_map", "num_category",
                                        RESPONSE_CATEGORIES),
            query_risk_levels=_labels(raw, "query_risk_level_map", "num_query_risk_level",
                                      RISK_LEVELS),
            query_categories=_labels(raw, "query_category_map", "num_query_category",
                                     QUERY_CATEGORIES),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_id=_first_int(raw.get("eos_token_id")),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> GuardConfig:
        return cls.from_dict(read_config_json(path))

    def to_dict(self) -> dict[str, Any]:
        """The config.json form (Hugging Face field names, label maps with string keys)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                               if not f.name.endswith(("_levels", "_categories"))}
        out.update(
            num_risk_level=len(self.response_risk_levels),
            num_category=len(self.response_categories),
            num_query_risk_level=len(self.query_risk_levels),
            num_query_category=len(self.query_categories),
            response_risk_level_map=_as_map(self.response_risk_levels),
            response_category_map=_as_map(self.response_categories),
            query_risk_level_map=_as_map(self.query_risk_levels),
            query_category_map=_as_map(self.query_categories),
        )
        return out


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The parsed config.json object; ConfigError when it is missing, not JSON, or not an object.
    Every model kind reads its config.json through here."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no config.json at {path}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _rope_theta(raw: dict[str, Any]) -> float:
    # transformers 5 moved rope_theta into rope_parameters; accept both spellings.
    if "rope_theta" in raw:
        return raw["rope_theta"]
    params = raw.get("rope_parameters") or {}
    if "rope_theta" in params:
        return params["rope_theta"]
    raise ConfigError("config.json is missing required field: rope_theta")


def _labels(raw: dict[str, Any], map_key: str, count_key: str,
            default: tuple[str, ...]) -> tuple[str, ...]:
    count = raw.get(count_key)
    mapping = raw.get(map_key)
    if mapping is None:
        if count is not None and count != len(default):
            raise ConfigError(
                f"config field {count_key!r} is {count} but no {map_key!r} is given and the "
                f"default has {len(default)} labels"
            )
        return default
    if not isinstance(mapping, dict):
        raise ConfigError(f"config field {map_key!r} must be an object, got {mapping!r}")
    try:
        by_index = {int(key): str(value) for key, value in mapping.items()}
    except ValueError:
        raise ConfigError(
            f"config field {map_key!r} has non-integer keys: {list(mapping)}") from None
    if sorted(by_index) != list(range(len(by_index))):
        raise ConfigError(f"config field {map_key!r} keys must be 0..n-1, got {sorted(by_index)}")
    if count is not None and count != len(by_index):
        raise ConfigError(
            f"config field {count_key!r} is {count} but {map_key!r} has {len(by_index)} labels"
        )
    return tuple(by_index[i] for i in range(len(by_index)))


def _as_map(labels: tuple[str, ...]) -> dict[str, str]:
    return {str(i): label for i, label in enumerate(labels)}


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value
