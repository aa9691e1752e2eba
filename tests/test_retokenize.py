"""IncrementalTokenizer: ids from streamed deltas equal the one-shot Qwen3 tokenization."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from qguard_stream.assets import tokenizer_dir
from qguard_stream.integrations.retokenize import (
    IncrementalTokenizer,
    UnsupportedTokenizerError,
    is_safe_starter,
)

# Pieces that stress each stage: added tokens (whole, partial), whitespace runs, contractions,
# digits, CJK, emoji with ZWJ / flags / variation selectors, combining marks, Hangul jamo.
FRAGMENTS = [
    "<|im_end|>", "<|im_start|>", "<think>", "</think>", "<|endoftext|>", "<|im_", "<|", "<", "|>",
    " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n", "\u00a0", "\u3000", "\x0b", "\x85", "\u2028",
    "'s", "'re", "'LL", "'", "’s", " 's", "don't", "123", "4", "3.14", "-", ".", ",", "!!", "?",
    "hello", "Hello", " world", "x", "ö", "ﬁ", "\u212b", "A\u030a", "e\u0301", "\u0301",
    "a\u0328\u0301", "\u0f73", "\u0915\u093c", "\u0b47\u0b3e", "\u1100\u1161\u11a8", "가",
    "\u11a8", "日本語", "，", "。", "\u0627\u0644", "👩\u200d👩\u200d👧", "\U0001F1FA\U0001F1F8",
    "\u200d", "\ufe0f", "😀",
]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=24).map(
    "".join)
PROPERTY = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def one_shot(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stream(tokenizer, deltas: list[str | bytes]) -> tuple[list[int], list[int]]:
    """(ids returned by the pushes, ids returned by the pushes and the final flush)."""
    incremental = IncrementalTokenizer(tokenizer)
    pushed = [i for delta in deltas for i in incremental.push(delta)]
    return pushed, pushed + incremental.flush()


def split_at(sequence, cuts: list[int]):
    points = sorted({c % (len(sequence) + 1) for c in cuts})
    return [sequence[a:b] for a, b in zip([0, *points], [*points, len(sequence)])]


@PROPERTY
@given(text=texts, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_str_deltas_split_anywhere_give_one_shot_ids(qwen_tokenizer, text, cuts):
    _, ids = stream(qwen_tokenizer, split_at(text, cuts))
    assert ids == one_shot(qwen_tokenizer, text)


@PROPERTY
@given(text=texts, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_byte_deltas_split_inside_utf8_characters_give_one_shot_ids(qwen_tokenizer, text, cuts):
    _, ids = stream(qwen_tokenizer, split_at(text.encode(), cuts))
    assert ids == one_shot(qwen_tokenizer, text)


@PROPERTY
@given(text=texts, cuts=st.lists(st.integers(min_value=0), max_size=8),
       byte_cuts=st.lists(st.integers(min_value=0), max_size=8), as_bytes=st.lists(st.booleans()))
def test_mixed_str_and_byte_deltas_give_one_shot_ids(qwen_tokenizer, text, cuts, byte_cuts,
                                                      as_bytes):
    deltas: list[str | bytes] = []
    for i, piece in enumerate(split_at(text, cuts)):
        if i < len(as_bytes) and as_bytes[i]:
            deltas.extend(split_at(piece.encode(), byte_cuts))
        else:
            deltas.append(piece)
    _, ids = stream(qwen_tokenizer, deltas)
    assert ids == one_shot(qwen_tokenizer, text)


# Few classes, densely mixed: contraction starts, whitespace kinds, digits, punctuation, '<'.
DENSE = ["'", "s", "r", "e", "l", "L", "v", "t", "d", "m", "a", "A", " ", "\n", "\r", "\t", "\x0c",
         "\u00a0", "\u3000", "1", ".", "!", "_", "’", "<", "|", ">", "é", "\u0301", "日",
         "<|im_end|>", "<think>"]


@PROPERTY
@given(text=st.lists(st.sampled_from(DENSE), min_size=1, max_size=30).map("".join),
       size=st.integers(min_value=1, max_value=3))
def test_dense_class_mixes_fed_in_tiny_deltas_give_one_shot_ids(qwen_tokenizer, text, size):
    _, ids = stream(qwen_tokenizer, [text[i:i + size] for i in range(0, len(text), size)])
    assert ids == one_shot(qwen_tokenizer, text)


ADVERSARIAL = [
    "Hello world, this is a test.", "   leading spaces", "trailing spaces   ", "a  \n\n  b",
    "line\n\n\n   indented\n\tTabbed", "x \r\n y", "It's they're we've I'm you'll he'd",
    "IT'S THEY'RE", "'re 're'", "1234567890 3.14159 1,000,000", "日本語のテキスト，混在 text 123。",
    "emoji 👩\u200d👩\u200d👧\u200d👦 family 🇺🇸 flag ❤\ufe0f", "e\u0301 cafe\u0301 A\u030a \u212b",
    "\u1100\u1161\u11a8\u1100\u1161 가\u11a8", "<|im_start|>user\nhi<|im_end|>\n",
    "text<|im_end|>more<|im_start|>", "<<|im_end|>|>", "<|im_en", "a<think>\n\n</think>\n\nb",
    "ok <|im_end", "\u00a0\u00a0x\u3000\u3000y", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 ok",
    "don't   stop\n\n", "\U0001F600\U0001F600\U0001F600", "a\u0328\u0301\u0f73\u0f73b",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_text_fed_one_character_at_a_time(qwen_tokenizer, text):
    _, ids = stream(qwen_tokenizer, list(text))
    assert ids == one_shot(qwen_tokenizer, text)


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_adversarial_text_fed_one_byte_at_a_time(qwen_tokenizer, text):
    data = text.encode()
    _, ids = stream(qwen_tokenizer, [data[i:i + 1] for i in range(len(data))])
    assert ids == one_shot(qwen_tokenizer, text)


def test_only_the_unstable_last_word_is_held_back(qwen_tokenizer):
    incremental = IncrementalTokenizer(qwen_tokenizer)
    ids = incremental.push("Hello world, this is")
    assert ids == one_shot(qwen_tokenizer, "Hello world, this")
    assert incremental.pending_text == " is"


def test_punctuation_is_emitted_once_the_next_character_is_known(qwen_tokenizer):
    incremental = IncrementalTokenizer(qwen_tokenizer)
    assert incremental.push("We bake. Then") == one_shot(qwen_tokenizer, "We bake.")
    assert incremental.pending_text == " Then"


def test_trailing_spaces_wait_for_the_next_character(qwen_tokenizer):
    incremental = IncrementalTokenizer(qwen_tokenizer)
    assert incremental.push("Hello  ") == one_shot(qwen_tokenizer, "Hello")
    assert incremental.pending_text == "  "
    ids = incremental.push("world") + incremental.flush()
    assert ids == one_shot(qwen_tokenizer, "  world")  # " " then " world"


def test_partially_typed_added_token_is_held_then_emitted_whole(qwen_tokenizer):
    incremental = IncrementalTokenizer(qwen_tokenizer)
    assert incremental.push("ok<|im_") == []
    assert incremental.push("end|>") == [*one_shot(qwen_tokenizer, "ok"), 151645]
    assert incremental.pending_text == ""


def test_most_ids_of_prose_are_emitted_before_flush(qwen_tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    pushed, ids = stream(qwen_tokenizer, [text[i:i + 3] for i in range(0, len(text), 3)])
    assert ids == one_shot(qwen_tokenizer, text)
    assert len(ids) - len(pushed) <= 2


def test_invalid_utf8_raises_and_keeps_state(qwen_tokenizer):
    incremental = IncrementalTokenizer(qwen_tokenizer)
    incremental.push(b"ab\xc3")
    with pytest.raises(ValueError, match=r"not valid UTF-8"):
        incremental.push(b"\xff")
    assert incremental.pending_bytes == b"\xc3"
    assert incremental.push(b"\xa9") + incremental.flush() == one_shot(qwen_tokenizer, "abé")


def test_str_delta_inside_a_utf8_character_raises(qwen_tokenizer):
    incremental = IncrementalTokenizer(qwen_tokenizer)
    incremental.push(b"\xe6\x97")
    with pytest.raises(ValueError, match=r"inside a UTF-8 character"):
        incremental.push("x")
    with pytest.raises(ValueError, match=r"ends inside a UTF-8 character"):
        incremental.flush()


def test_bad_delta_types_and_surrogates_raise(qwen_tokenizer):
    incremental = IncrementalTokenizer(qwen_tokenizer)
    with pytest.raises(TypeError, match=r"got int"):
        incremental.push(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"surrogate"):
        incremental.push("a\ud800b")
    assert incremental.pending_text == ""


def test_snapshot_restore_undoes_a_push(qwen_tokenizer):
    incremental = IncrementalTokenizer(qwen_tokenizer)
    incremental.push("Hello wor")
    saved = incremental.snapshot()
    incremental.push("ld, again")
    incremental.restore(saved)
    assert incremental.pending_text == " wor"


def test_tokenizer_with_another_pipeline_is_refused():
    from tokenizers import Tokenizer, models, normalizers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFKC()
    with pytest.raises(UnsupportedTokenizerError, match=r"NFKC"):
        IncrementalTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend))
    with pytest.raises(UnsupportedTokenizerError, match=r"backend_tokenizer"):
        IncrementalTokenizer(object())


def test_safe_starters_exclude_characters_nfc_joins_backwards():
    assert is_safe_starter("a") and is_safe_starter("日") and is_safe_starter("👩")
    assert not is_safe_starter("\u0301")  # combining acute
    assert not is_safe_starter("\u1161")  # Hangul vowel joins the leading consonant
    assert not is_safe_starter("\u0b3e")  # Oriya AA composes with a preceding E (ccc 0)
    assert not is_safe_starter("\u0f73")  # decomposes to non-starters
