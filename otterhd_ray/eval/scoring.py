"""Multiple-choice answer parsing: `strict` (ours) and `legacy` (the seed's parser, bugs included).

strict accepts, in this order, and returns None when nothing matches (counted as "unparsed", scored wrong):
1. "The answer is X" / "Answer: X" / "answer is (X)" (any case of the phrase, X an offered letter);
2. a standalone letter: the whole reply is "X", "(X)", "X." or it starts with "X." / "X)" / "(X)" / "X:";
3. exact option text: the reply, normalised (case, surrounding punctuation, a leading article), equals one
   option's text, or is "X. <that option's text>".
A reply such as "A man is standing there" is *not* A: a capital letter inside prose is not an answer.

legacy reproduces OtterHD's `MagnifierBenchDataset.parse_pred_ans` so numbers stay comparable with the paper:
"The answer is ([A-D])", then the first of A, B, C, D (in that order) that occurs *anywhere* in the reply
("A man..." -> A; "B, not A" -> A), then option text found anywhere, then letters again; else "other".
"""

from __future__ import annotations

import re
import string
from typing import Literal

_PHRASE_RE = re.compile(
    r"\b(?:the\s+)?(?:correct\s+)?answer\s*(?:is|:)\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])", re.I
)
_WHOLE_LETTER_RE = re.compile(r"^\(?([A-Z])\)?[.)]?$")
_LEADING_LETTER_RE = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.):])(?:\s|$)")
_ARTICLES = ("a ", "an ", "the ")


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation or leading article: 'The Red.' -> 'red'."""
    text = " ".join(text.lower().split()).strip(string.punctuation + " \"'“”‘’")
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article) :]
            break
    return text.strip()


def parse_mc_strict(reply: str, options: dict[str, str]) -> str | None:
    """The letter the reply chooses among `options`, or None when it does not clearly choose one."""
    text = reply.strip()
    if not text:
        return None
    m = _PHRASE_RE.search(text)
    if m and m.group(1).upper() in options and m.group(1).isupper():
        return m.group(1)
    m = _WHOLE_LETTER_RE.match(text)
    if m and m.group(1) in options:
        return m.group(1)
    m = _LEADING_LETTER_RE.match(text)
    if m:
        letter = m.group(1) or m.group(2)
        if letter in options:
            return letter
    wanted = normalize_text(text)
    matches = [letter for letter, opt in options.items() if normalize_text(opt) == wanted]
    if len(matches) == 1:
        return matches[0]
    return None


_LEGACY_OPTIONS_RE = re.compile("A\\. (.+?), B\\. (.+?), C\\. (.+?), D\\. (.+)")


def parse_mc_legacy(reply: str, question: str) -> str:
    """The seed's parser, verbatim in behaviour: returns a letter or "other".

    `question` is the full multiple-choice question as the seed passes it (prompt + instruction).
    """
    match = re.search(r"The answer is ([A-D])", reply)
    if match:
        return match.group(1)
    choices = ["A", "B", "C", "D"]
    for selection in choices:
        if selection in reply:
            return selection
    matches = _LEGACY_OPTIONS_RE.search(question)
    if matches:
        options = {c: matches.group(i + 1) for i, c in enumerate(choices)}
        for c, option in options.items():
            option = option.strip()
            if option.endswith((".", ",", "?")):
                option = option[:-1]
            if option.upper() in reply.upper():
                return c
    for selection in choices:
        if selection in reply.upper():
            return selection
    return "other"


def parse_mc(
    reply: str, options: dict[str, str], question: str, mode: Literal["strict", "legacy"]
) -> str | None:
    """Dispatch on the configured mode; legacy's "other" becomes None (unparsed) for the counts."""
    if mode == "strict":
        return parse_mc_strict(reply, options)
    if mode == "legacy":
        letter = parse_mc_legacy(reply, question)
        return None if letter == "other" else letter
    raise ValueError(f"unknown mc parse mode {mode!r}; expected 'strict' or 'legacy'")
