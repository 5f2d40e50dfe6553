"""LLaVA instruction JSON / JSONL (`haotian-liu/LLaVA:docs/Finetune_Custom_Data.md`)::

    [{"id": "1", "image": "coco/train2017/000000000001.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}]

`image` is a path under `--image-root` (default: the JSON file's directory); absent or empty = a text-only
record. A list of images is accepted and counted as `multi_image`. Extra keys are ignored. Unlike LLaVA's
trainer, a leading non-human turn is rejected (`bad_turn_order`), not dropped, and a placeholder count other than
the number of images is `image_count_mismatch`, not silently re-laid out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from otterhd_ray.data.formats.common import (
    Converter,
    ImageRef,
    Parsed,
    RecordError,
    normalise_role,
    record_id,
)


def image_refs(value: Any, field_name: str) -> list[ImageRef]:
    """Paths (a string or a list of strings; dicts with `bytes`/`path` as HF writes them) -> ImageRefs."""
    if value is None or value == "" or value == []:
        return []
    items = value if isinstance(value, list) else [value]
    refs = []
    for item in items:
        if isinstance(item, str) and item:
            refs.append(ImageRef(path=item))
        elif isinstance(item, Mapping) and (item.get("bytes") is not None or item.get("path")):
            refs.append(ImageRef(data=item.get("bytes"), path=item.get("path")))
        else:
            raise RecordError("bad_image_field", f"{field_name} entry {item!r:.80} is not a path")
    return refs


def message_turns(messages: Any, role_key: str | None = None, content_key: str | None = None,
                  roles: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """[(role, text)] of a message list; keys default to role/content when present, else from/value."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("empty_conversation", "no turns")
    turns = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise RecordError("bad_turn", f"turn {i} is a {type(msg).__name__}, not an object")
        rk = role_key or ("role" if "role" in msg else "from")
        ck = content_key or ("content" if "content" in msg else "value")
        text = msg.get(ck)
        if not isinstance(text, str):
            raise RecordError("missing_text", f"turn {i} has no string {ck!r}")
        role = msg.get(rk)
        if roles is not None:
            if role not in roles:
                raise RecordError("bad_role", f"turn {i} has role {role!r} (known: {sorted(roles)})")
            turns.append((roles[role], text))
        else:
            turns.append((normalise_role(role), text))
    return turns


class LlavaConverter(Converter):
    name = "llava"

    def parse(self, raw: Mapping[str, Any], path: str) -> Parsed:
        turns = message_turns(raw.get("conversations"), "from", "value")
        return Parsed(record_id(raw), turns, image_refs(raw.get("image"), "image"))
