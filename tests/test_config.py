"""GuardConfig from config.json: defaults, label maps, spellings, and clear errors."""

from __future__ import annotations

import pytest

from qguard_stream import ConfigError, GuardConfig
from qguard_stream.checkpoints import config_for, hf_config_dict
from qguard_stream.config import QUERY_CATEGORIES, RESPONSE_CATEGORIES


def raw(**changes):
    import torch

    data = hf_config_dict(config_for("tiny"), torch.float32)
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def test_round_trip_through_config_json_form():
    assert GuardConfig.from_dict(raw()) == config_for("tiny")


def test_labels_default_when_maps_are_absent():
    data = raw(
        response_category_map=...,
        query_category_map=...,
        response_risk_level_map=...,
        query_risk_level_map=...,
    )
    config = GuardConfig.from_dict(data)
    assert config.response_categories == RESPONSE_CATEGORIES
    assert config.query_categories[-1] == "Jailbreak" and len(QUERY_CATEGORIES) == 9
    assert config.response_risk_levels == ("Safe", "Unsafe", "Controversial")


def test_labels_come_from_the_config_maps():
    config = GuardConfig.from_dict(raw(response_risk_level_map={"0": "OK", "1": "Bad", "2": "Meh"}))
    assert config.response_risk_levels == ("OK", "Bad", "Meh")


def test_rope_theta_in_rope_parameters_is_accepted():
    config = GuardConfig.from_dict(raw(rope_theta=..., rope_parameters={"rope_theta": 5000.0}))
    assert config.rope_theta == 5000.0


def test_head_dim_is_read_not_derived():
    assert GuardConfig.from_dict(raw()).head_dim == 32  # tiny: hidden 64 / 4 heads would be 16


@pytest.mark.parametrize(
    "field",
    [
        "hidden_size",
        "num_key_value_heads",
        "guard_inner_size",
        "vocab_size",
        "max_position_embeddings",
    ],
)
def test_missing_field_is_named(field):
    with pytest.raises(ConfigError, match=field):
        GuardConfig.from_dict(raw(**{field: ...}))


def test_heads_not_divisible_by_kv_heads_is_named():
    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\).*num_key_value_heads \(3\)"):
        GuardConfig.from_dict(raw(num_key_value_heads=3))


def test_hidden_not_divisible_by_heads_without_head_dim_is_named():
    with pytest.raises(ConfigError, match=r"hidden_size \(64\).*num_attention_heads \(5\)"):
        GuardConfig.from_dict(raw(head_dim=..., num_attention_heads=5, num_key_value_heads=5))


def test_label_map_count_mismatch_is_named():
    with pytest.raises(ConfigError, match="num_category"):
        GuardConfig.from_dict(raw(num_category=7))


def test_non_positive_size_is_named():
    with pytest.raises(ConfigError, match="'num_hidden_layers'.*0"):
        GuardConfig.from_dict(raw(num_hidden_layers=0))
