"""The conversation contract of a shard row, checked without the tokenizer (so importers stay light: importing
`processor` pulls in transformers and torch, ~400 MB of a converter's memory)."""

from __future__ import annotations

from typing import Any

from otterhd_ray.data.images import BadSample


def validate_conversation(conversations: Any) -> list[tuple[str, str]]:
    """Check a conversation and return its (instruction, answer) pairs; `BadSample` with a reason code if bad.

    Reasons: `empty_conversation`, `bad_turn` (not a mapping), `bad_role` (role not user/assistant),
    `missing_text` (absent, not a string, or blank), `bad_turn_order` (not user/assistant alternating from the
    user), `no_assistant_turn`, `unanswered_turn` (ends with a user turn).
    """
    if conversations is None or isinstance(conversations, (str, bytes)) or len(conversations) == 0:
        raise BadSample("empty_conversation", "no turns")
    turns: list[tuple[str, str]] = []
    for index, turn in enumerate(conversations):
        if not hasattr(turn, "get"):
            raise BadSample("bad_turn", f"turn {index} is a {type(turn).__name__}, not a mapping")
        role, text = turn.get("role"), turn.get("text")
        if role not in ("user", "assistant"):
            raise BadSample("bad_role", f"turn {index} has role {role!r}")
        if not isinstance(text, str) or not text.strip():
            raise BadSample("missing_text", f"turn {index} ({role}) has no text")
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            if not any(t.get("role") == "assistant" for t in conversations if hasattr(t, "get")):
                raise BadSample("no_assistant_turn", "conversation has no assistant turn")
            raise BadSample("bad_turn_order", f"turn {index} is {role!r}, expected {expected!r}")
        if role == "assistant":
            turns.append((conversations[index - 1]["text"], text))
    if not turns:
        raise BadSample("no_assistant_turn", "conversation has no assistant turn")
    if len(conversations) % 2 == 1:
        raise BadSample("unanswered_turn", "conversation ends with a user turn")
    return turns
