"""The Gen verdict parser: the model card's outputs, every label and category, layout tolerance,
and malformed text reported as unparseable."""

from __future__ import annotations

import pytest

from qguard_stream.gen.parse import GEN_CATEGORIES, SAFETY_LABELS, parse_gen_output


def test_model_card_prompt_example():
    verdict = parse_gen_output("Safety: Unsafe\nCategories: Violent\n", "prompt")
    assert (verdict.safety, verdict.categories, verdict.refusal) == ("Unsafe", ("Violent",), None)
    assert verdict.parsed and verdict.error is None


def test_model_card_response_example():
    verdict = parse_gen_output("Safety: Safe\nCategories: None\nRefusal: Yes", "response")
    assert (verdict.safety, verdict.categories, verdict.refusal) == ("Safe", (), True)
    assert verdict.raw_text == "Safety: Safe\nCategories: None\nRefusal: Yes"


@pytest.mark.parametrize("label", SAFETY_LABELS)
def test_every_safety_label(label):
    assert parse_gen_output(f"Safety: {label}\nCategories: None", "prompt").safety == label


@pytest.mark.parametrize("category", GEN_CATEGORIES)
def test_every_prompt_category(category):
    verdict = parse_gen_output(f"Safety: Unsafe\nCategories: {category}", "prompt")
    assert verdict.categories == (category,)


@pytest.mark.parametrize("category", GEN_CATEGORIES[:-1])
def test_every_response_category(category):
    verdict = parse_gen_output(f"Safety: Unsafe\nCategories: {category}\nRefusal: No", "response")
    assert verdict.categories == (category,) and verdict.refusal is False


def test_multi_category_line_keeps_order():
    text = "Safety: Unsafe\nCategories: Violent, Non-violent Illegal Acts, PII"
    assert parse_gen_output(text, "prompt").categories == (
        "Violent", "Non-violent Illegal Acts", "PII")


def test_whitespace_blank_lines_and_field_order_are_tolerated():
    text = ("\n  Refusal :No \n\nCategories:Suicide & Self-Harm ,  Unethical Acts\n"
            " Safety:Controversial")
    verdict = parse_gen_output(text, "response")
    assert verdict.safety == "Controversial"
    assert verdict.categories == ("Suicide & Self-Harm", "Unethical Acts")
    assert verdict.refusal is False


@pytest.mark.parametrize("text, kind, reason", [
    ("", "prompt", "no 'Safety:' line"),
    ("Safety: Unsafe", "prompt", "no 'Categories:' line"),
    ("Safety: unsafe\nCategories: None", "prompt", "unknown safety label 'unsafe'"),
    ("Safety: Dangerous\nCategories: None", "prompt", "unknown safety label"),
    ("Safety: Unsafe\nCategories: Weapons", "prompt", "unknown prompt category 'Weapons'"),
    ("Safety: Unsafe\nCategories: Jailbreak\nRefusal: No", "response",
     "unknown response category 'Jailbreak'"),
    ("Safety: Unsafe\nCategories: None, Violent", "prompt", "unknown prompt category 'None'"),
    ("Safety: Unsafe\nCategories: PII, PII", "prompt", "repeated category"),
    ("Safety: Unsafe\nCategories: Violent,", "prompt", "unknown prompt category ''"),
    ("Safety: Safe\nSafety: Unsafe\nCategories: None", "prompt", "more than once"),
    ("Safety: Safe\nCategories: None\nRefusal: No", "prompt", "only expected"),
    ("Safety: Safe\nCategories: None", "response", "no 'Refusal:' line"),
    ("Safety: Safe\nCategories: None\nRefusal: Maybe", "response", "Yes or No"),
    ("Safety: Safe\nCategories: None\nI think this is fine.", "prompt", "unexpected line"),
    ("assistantassistant", "prompt", "unexpected line"),
])
def test_malformed_output_is_reported_not_guessed(text, kind, reason):
    verdict = parse_gen_output(text, kind)
    assert not verdict.parsed
    assert verdict.safety is None and verdict.categories == () and verdict.refusal is None
    assert reason in verdict.error
    assert verdict.raw_text == text


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="'query'"):
        parse_gen_output("Safety: Safe\nCategories: None", "query")
