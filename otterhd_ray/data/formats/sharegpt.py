"""LLaMA-Factory's sharegpt and alpaca formats, with the column mapping of its `dataset_info.json`
(`hiyouga/LLaMA-Factory:data/README.md`).

sharegpt: `messages` [{role, content}] (OpenAI style) or `conversations` [{from, value}], an optional `system`
column and `images` (paths under the media dir: `--image-root`, else the directory of `dataset_info.json` /
the input file). Roles are mapped with the entry's `tags` (`role_tag`, `content_tag`, `user_tag`,
`assistant_tag`, `system_tag`); observation / function-call turns have no place in our shards (`bad_role`).

alpaca: `{instruction, input, output, system, history: [[q, a], ...], images}`; the user turn is
`instruction + "\\n" + input` (as LLaMA-Factory builds it), history turns come first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from otterhd_ray.data.formats.common import Converter, Parsed, RecordError, record_id
from otterhd_ray.data.formats.llava import image_refs, message_turns

SHAREGPT_DEFAULT_COLUMNS = {"messages": "conversations", "images": "images", "system": "system"}
ALPACA_DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                          "system": "system", "images": "images"}
SHAREGPT_DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                         "system_tag": "system"}


@dataclass
class DatasetInfo:
    """One `dataset_info.json` entry, resolved: the files to read, the formatting, columns and tags."""

    name: str
    formatting: str
    files: list[str]
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    media_dir: str = ""


def load_dataset_info(info_path: str, name: str) -> DatasetInfo:
    """Read entry `name` of LLaMA-Factory's `dataset_info.json`; ValueError naming the file/key when unusable."""
    try:
        with open(info_path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"file not found: {info_path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{info_path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or name not in doc:
        known = sorted(doc) if isinstance(doc, dict) else []
        raise ValueError(f"{info_path}: no dataset {name!r} (entries: {known[:20]})")
    entry = doc[name]
    if not isinstance(entry, dict) or "file_name" not in entry:
        hub = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if k in entry]
        why = f"it is fetched from {hub[0]}; download it and use file_name" if hub else "it has no file_name"
        raise ValueError(f"{info_path}: dataset {name!r} cannot be converted offline: {why}")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise ValueError(f"{info_path}: dataset {name!r} has formatting {formatting!r}; "
                         "supported: alpaca, sharegpt")
    if entry.get("ranking"):
        raise ValueError(f"{info_path}: dataset {name!r} is a ranking (preference) dataset; not supported")
    base = os.path.dirname(os.path.abspath(info_path))
    target = os.path.join(base, entry["file_name"])
    if os.path.isdir(target):
        files = sorted(os.path.join(target, n) for n in os.listdir(target)
                       if n.endswith((".json", ".jsonl")) and not n.startswith("."))
    else:
        files = [target]
    for tag_key in ("observation_tag", "function_tag"):
        entry.get("tags", {}).pop(tag_key, None)  # such turns are refused as bad_role anyway
    return DatasetInfo(name, formatting, files, dict(entry.get("columns") or {}), dict(entry.get("tags") or {}),
                       base)


class ShareGPTConverter(Converter):
    name = "sharegpt"

    def __init__(self, *, columns: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.columns = dict(columns or {})
        self.tags = dict(tags or {})
        self.roles = None
        if self.tags:  # explicit tags (dataset_info.json): only these role names are valid
            t = {**SHAREGPT_DEFAULT_TAGS, **self.tags}
            self.roles = {t["user_tag"]: "user", t["assistant_tag"]: "assistant", t["system_tag"]: "system"}

    def parse(self, raw: Mapping[str, Any], path: str) -> Parsed:
        key = self.columns.get("messages") or ("messages" if "messages" in raw else "conversations")
        if key not in raw:
            raise RecordError("empty_conversation", f"no {key!r} column")
        turns = message_turns(raw.get(key), self.tags.get("role_tag"), self.tags.get("content_tag"), self.roles)
        system = raw.get(self.columns.get("system", "system"))
        if isinstance(system, str) and system.strip():
            turns.insert(0, ("system", system))
        images_key = self.columns.get("images", "images")
        return Parsed(record_id(raw), turns, image_refs(raw.get(images_key), images_key))


class AlpacaConverter(Converter):
    name = "alpaca"

    def __init__(self, *, columns: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.columns = {**ALPACA_DEFAULT_COLUMNS, **dict(columns or {})}

    def parse(self, raw: Mapping[str, Any], path: str) -> Parsed:
        c = self.columns
        prompt, query, response = raw.get(c["prompt"]), raw.get(c["query"]), raw.get(c["response"])
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecordError("missing_text", f"no {c['prompt']!r}")
        if not isinstance(response, str):
            raise RecordError("missing_text", f"{c['response']!r} is not a string")
        user = prompt + ("\n" + query if isinstance(query, str) and query else "")
        turns: list[tuple[str, str]] = []
        system = raw.get(c["system"])
        if isinstance(system, str) and system.strip():
            turns.append(("system", system))
        history = raw.get(c["history"]) or []
        if not isinstance(history, list):
            raise RecordError("bad_turn", f"{c['history']!r} is not a list of [query, response] pairs")
        for pair in history:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RecordError("bad_turn", f"history entry {pair!r:.80} is not [query, response]")
            turns += [("user", pair[0]), ("assistant", pair[1])]
        turns += [("user", user), ("assistant", response)]
        return Parsed(record_id(raw), turns, image_refs(raw.get(c["images"]), c["images"]))
