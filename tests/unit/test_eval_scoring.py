"""MC parsing: strict refuses prose that merely contains a capital letter; legacy keeps the seed's bugs."""

from __future__ import annotations

import pytest

from otterhd_ray.eval.scoring import normalize_text, parse_mc, parse_mc_legacy, parse_mc_strict

OPTIONS = {"A": "orange", "B": "purple", "C": "blue", "D": "green"}
QUESTION = (
    "Answer with the option letter from the given choices directly. "
    "What color is the small triangle? A. orange, B. purple, C. blue, D. green"
)


@pytest.mark.parametrize(
    "reply, strict, legacy",
    [
        ("A", "A", "A"),
        ("(B)", "B", "B"),
        ("C.", "C", "C"),
        ("D) green", "D", "D"),
        ("B. purple", "B", "B"),
        ("The answer is C.", "C", "C"),
        ("I think the answer is (D)", "D", "D"),
        ("Answer: B", "B", "A"),  # legacy: the "A" of "Answer" comes first
        ("A man is standing next to it.", None, "A"),  # the seed's headline bug
        ("Because it is blue", None, "B"),  # legacy: capital B of "Because"
        ("green", "D", "D"),
        ("The Green.", "D", "D"),
        ("It is blue or green", None, "C"),  # strict: hedged; legacy: first option text found
        ("purple-ish", None, "B"),
        ("the answer is c", None, "A"),  # strict: lower-case letter not trusted; legacy: "A" of "ANSWER"
        ("", None, "other"),
        ("no idea", None, "A"),  # legacy upper-cases the reply: "NO IDEA" holds an A
        ("nothing here", None, "other"),
        ("E", None, "other"),  # not an offered letter
    ],
)
def test_strict_and_legacy(reply, strict, legacy):
    assert parse_mc_strict(reply, OPTIONS) == strict
    assert parse_mc_legacy(reply, QUESTION) == legacy


def test_legacy_letter_order_not_position():
    # The seed scans A, B, C, D in that order, not by where they appear: "D, not A" is read as A.
    assert parse_mc_legacy("D, not A", QUESTION) == "A"
    assert parse_mc_strict("D, not A", OPTIONS) is None


def test_legacy_strips_trailing_punctuation_of_last_option():
    q = "What is it? A. cat, B. dog, C. bird, D. fish."
    assert parse_mc_legacy("a fish", q) == "D"


def test_strict_only_offered_letters():
    assert parse_mc_strict("C", {"A": "x", "B": "y"}) is None
    assert parse_mc_strict("The answer is C", {"A": "x", "B": "y"}) is None


def test_parse_mc_modes():
    assert parse_mc("A man", OPTIONS, QUESTION, "strict") is None
    assert parse_mc("A man", OPTIONS, QUESTION, "legacy") == "A"
    assert parse_mc("nothing", OPTIONS, QUESTION, "legacy") is None  # "other" counts as unparsed
    with pytest.raises(ValueError):
        parse_mc("A", OPTIONS, QUESTION, "fuzzy")


def test_normalize_text():
    assert normalize_text("  The  Red Car. ") == "red car"
    assert normalize_text("An apple!") == "apple"
    assert normalize_text('"Blue"') == "blue"
