"""The tiny offline tokenizer, `load_tokenizer` and the special-token lookup."""

from __future__ import annotations

import dataclasses
import string

import pytest
from transformers import PreTrainedTokenizerFast

from otterhd_ray.data.tokenizer import (
    BOA_TOKEN,
    BOS_TOKEN,
    END_TOKEN,
    IMAGE_TOKEN,
    NEWLINE_TOKEN,
    UNK_TOKEN,
    FuyuTokens,
    build_tiny_tokenizer,
    fuyu_tokens,
    load_tokenizer,
)

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the color of the small object at the top-left? Answer with A, B, C or D.",
    "Numbers 0123456789 and symbols !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "  leading spaces, double  spaces and trailing space ",
    "Line one\nLine two\ttabbed",
    "Non-ASCII still round-trips: café, “quotes”, — dash, 日本語, emoji 🦦",
    string.ascii_letters + string.digits,
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def test_build_is_deterministic(tmp_path, tiny_tokenizer_dir):
    build_tiny_tokenizer(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes(), name


def test_small_vocab_with_fuyu_special_tokens(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert 256 < len(tok) < 1024
    vocab = tok.get_vocab()
    for token in (IMAGE_TOKEN, NEWLINE_TOKEN, BOS_TOKEN, END_TOKEN, BOA_TOKEN, UNK_TOKEN, "▁"):
        assert token in vocab, token
    assert tok.bos_token == BOS_TOKEN and tok.eos_token == END_TOKEN and tok.unk_token == UNK_TOKEN


def test_fuyu_tokens_are_looked_up(tok):
    ids = fuyu_tokens(tok)
    assert ids == FuyuTokens(
        image=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        newline=tok.convert_tokens_to_ids(NEWLINE_TOKEN),
        bos=tok.convert_tokens_to_ids(BOS_TOKEN),
        end=tok.convert_tokens_to_ids(END_TOKEN),
        boa=tok.convert_tokens_to_ids(BOA_TOKEN),
    )
    assert len(set(dataclasses.astuple(ids))) == 5
    assert tok.unk_token_id not in dataclasses.astuple(ids)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ids.image = 3  # type: ignore[misc]


@pytest.mark.parametrize("text", ENGLISH)
def test_text_round_trips_without_unk(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    # Metaspace (like sentencepiece) prepends "▁" only when the text does not already start with a space, and
    # the decoder strips one leading space: a text starting with spaces comes back with one fewer.
    expected = text[1:] if text.startswith(" ") else text
    assert tok.decode(ids) == expected


def test_common_words_are_single_tokens(tok):
    # keeps the tiny model's sequences short; "▁the" must win over spelling it out
    assert tok.tokenize("the answer is") == ["▁the", "▁answer", "▁is"]


def test_placeholder_string_tokenizes_as_hf_processor_expects(tok):
    # transformers' FuyuProcessor drops the first token of this encoding, expecting Metaspace's "▁"
    ids = tok(IMAGE_TOKEN * 3 + NEWLINE_TOKEN + BOS_TOKEN, add_special_tokens=False)["input_ids"]
    t = fuyu_tokens(tok)
    assert tok.convert_ids_to_tokens(ids[:1]) == ["▁"]
    assert ids[1:] == [t.image] * 3 + [t.newline, t.bos]


def test_boa_text_is_one_token_after_a_prompt(tok):
    ids = tok("User:What? Assistant:" + BOA_TOKEN, add_special_tokens=False)["input_ids"]
    assert ids[-1] == fuyu_tokens(tok).boa
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["▁Assistant:", BOA_TOKEN]


def test_end_token_in_text_is_the_special_token(tok):
    ids = tok("yes" + END_TOKEN, add_special_tokens=False)["input_ids"]
    assert ids[-1] == fuyu_tokens(tok).end


def _word_tokenizer(tokens: list[str], **special) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(tokens)}, unk_token=tokens[0]))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, **special)


def test_missing_tokens_are_named():
    tok = _word_tokenizer(["<unk>", "<s>", "|SPEAKER|", "|ENDOFTEXT|"], unk_token="<unk>")
    with pytest.raises(ValueError) as err:
        fuyu_tokens(tok)
    assert "|NEWLINE|" in str(err.value) and "<0x04>" in str(err.value)
    assert "|SPEAKER|" not in str(err.value)


def test_end_falls_back_to_eos_token():
    tok = _word_tokenizer(
        ["<unk>", "<s>", "|SPEAKER|", "|NEWLINE|", "<0x04>", "</s>"], unk_token="<unk>", eos_token="</s>"
    )
    assert fuyu_tokens(tok).end == 5


def test_no_end_and_no_eos_is_an_error():
    tok = _word_tokenizer(["<unk>", "<s>", "|SPEAKER|", "|NEWLINE|", "<0x04>"], unk_token="<unk>")
    with pytest.raises(ValueError, match="end"):
        fuyu_tokens(tok)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
