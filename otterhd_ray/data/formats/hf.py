"""Hugging Face datasets parquet (`datasets.Image` columns) and the_cauldron layout.

`datasets.Image` is stored as `struct<bytes: binary, path: string>` (a list of it for an image sequence); the
bytes are copied as they are, a null `bytes` falls back to `path` under `--image-root` (else the file's
directory). The text layout is found from the columns, once per file:

- `texts` = [{user, assistant, source}] (the_cauldron: no placeholders, the images precede turn 1);
- `messages` / `conversations` (sharegpt or LLaVA turns);
- `instruction` + `output` (alpaca); `question` (or `instruction`) + `answer` (VQA, MagnifierBench).

Images may come without `<image>` placeholders here (they then precede the text, as in the_cauldron); when
there are placeholders, their count must match. Files are read one row group at a time, in small batches.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from otterhd_ray.data.formats.common import Converter, ImageRef, Parsed, RecordError, record_id
from otterhd_ray.data.formats.llava import message_turns
from otterhd_ray.data.formats.sharegpt import AlpacaConverter
from otterhd_ray.data.shards import open_parquet_named

_SPLIT_FILE = re.compile(r"^(train|test|validation|val|dev)(-\d+-of-\d+|-\d+)?$")
BATCH_ROWS = 64


def is_image_type(t: pa.DataType) -> bool:
    """`datasets.Image` (struct with `bytes` and `path`) or a list of it."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return is_image_type(t.value_type)
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}


def text_layout(names: list[str]) -> str | None:
    cols = set(names)
    if "texts" in cols:
        return "texts"
    if "messages" in cols or "conversations" in cols:
        return "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"question", "answer"} <= cols or {"instruction", "answer"} <= cols:
        return "qa"
    return None


class HFConverter(Converter):
    name = "hf"
    implicit_images = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._alpaca = AlpacaConverter(**kwargs)
        self._layout: dict[str, tuple[str, list[str]]] = {}

    def source_for(self, path: str) -> str:
        """the_cauldron / hub layout `<config>/train-00000-of-00001.parquet`: the config is the name."""
        p = Path(path)
        return self.source or (p.parent.name if _SPLIT_FILE.match(p.stem) else p.stem)

    def records(self, path: str) -> Iterator[tuple[int, Any]]:
        pf = self.prepare(path)
        index = 0
        with pf:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS):
                for row in batch.to_pylist():
                    yield index, row
                    index += 1

    def prepare(self, path: str) -> pq.ParquetFile:
        """Open `path` and find its text layout and image columns (ValueError naming the file if it has none)."""
        pf = open_parquet_named(path)
        schema = pf.schema_arrow
        layout = text_layout(schema.names)
        if layout is None:
            raise ValueError(f"{path}: no text columns (texts / messages / conversations / instruction+output / "
                             f"question+answer / instruction+answer); columns: {schema.names}")
        self.check_layout(layout, schema.names, path)
        images = [f.name for f in schema if is_image_type(f.type)]
        self._layout[path] = (layout, images)
        return pf

    def check_layout(self, layout: str, names: list[str], path: str) -> None:
        """Subclasses require a layout (the_cauldron)."""

    def parse(self, raw: Mapping[str, Any], path: str) -> Parsed:
        layout, image_cols = self._layout.get(path) or (text_layout(list(raw)), ["images", "image"])
        images: list[ImageRef] = []
        for col in image_cols:
            value = raw.get(col)
            for item in value if isinstance(value, list) else [value]:
                if item is None:
                    continue
                if not isinstance(item, Mapping) or (item.get("bytes") is None and not item.get("path")):
                    raise RecordError("bad_image_field", f"{col} holds neither bytes nor a path")
                images.append(ImageRef(data=item.get("bytes"), path=item.get("path")))
        if layout == "texts":
            turns = cauldron_turns(raw.get("texts"))
        elif layout == "messages":
            turns = message_turns(raw.get("messages", raw.get("conversations")))
        elif layout == "alpaca":
            turns = self._alpaca.parse({k: v for k, v in raw.items() if k != "images"}, path).turns
        elif layout == "qa":
            question, answer = raw.get("question", raw.get("instruction")), raw.get("answer")
            if not isinstance(question, str) or not isinstance(answer, str):
                raise RecordError("missing_text", "question and answer must be strings")
            turns = [("user", question), ("assistant", answer)]
        else:
            raise RecordError("malformed_record", "no text columns")
        return Parsed(record_id(raw), turns, images)


def cauldron_turns(texts: Any) -> list[tuple[str, str]]:
    """the_cauldron `texts`: [{user, assistant, source}] -> alternating turns."""
    if not isinstance(texts, list) or not texts:
        raise RecordError("empty_conversation", "no texts")
    turns = []
    for i, t in enumerate(texts):
        if not isinstance(t, Mapping):
            raise RecordError("bad_turn", f"texts[{i}] is not an object")
        user, assistant = t.get("user"), t.get("assistant")
        if not isinstance(user, str) or not isinstance(assistant, str):
            raise RecordError("missing_text", f"texts[{i}] needs string user and assistant")
        turns += [("user", user), ("assistant", assistant)]
    return turns


class CauldronConverter(HFConverter):
    name = "cauldron"

    def check_layout(self, layout: str, names: list[str], path: str) -> None:
        if layout != "texts" or "images" not in names:
            raise ValueError(f"{path}: not the_cauldron layout (needs columns images, texts); columns: {names}")
