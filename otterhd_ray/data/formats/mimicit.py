"""MIMIC-IT / Otter -> shards (`Luodian/Otter:mimic-it/README.md`, FORMATS.md §4).

`convert_mimicit` turns the instruction JSON (`{"meta": ..., "data": {id: {instruction, answer, image_ids,
rel_ins_ids}}}`) plus the images (parquet with a `base64` column, or the legacy JSON of image id -> base64) into
shards, streaming the images so a 10 GB images file converts in bounded memory. Bad rows are rejected with a
reason into `out_dir/rejects.parquet` (naming the instructions file and the instruction's index in it), never
a crash.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from otterhd_ray.data.formats.common import DEFAULT_MAX_PIXELS, ConvertStats, RecordError, check_image
from otterhd_ray.data.rejects import reject_row
from otterhd_ray.data.shards import (
    PathLike,
    ShardWriter,
    open_parquet_named,
    resolve_filesystem,
    write_rejects,
)


class _Rejects(list):
    """Rejects rows naming the instructions file and the instruction's index in it (the train config and the
    position there for ids the instructions file does not have)."""

    def __init__(self, stats: ConvertStats, source: str, instructions: str, data: dict[str, Any],
                 train_config: str | None, order: list[str]) -> None:
        super().__init__()
        self.stats, self.source, self.instructions, self.train_config = stats, source, instructions, train_config
        self.position = {iid: i for i, iid in enumerate(data)}
        self.order_position = {iid: i for i, iid in enumerate(order)}

    def add(self, iid: str, reason: str, detail: str = "") -> None:
        self.stats.reject(reason)
        if iid in self.position:
            file, record = self.instructions, self.position[iid]
        else:
            file, record = self.train_config or self.instructions, self.order_position.get(iid)
        self.append(reject_row(iid, self.source, reason, detail, file=file, record=record))


@dataclass
class _Plan:
    """One output sample before its image is read: the instruction ids of its turns, in order."""

    sample_id: str
    image_id: str
    turns: list[tuple[str, str]]


def _read_json(path: PathLike) -> Any:
    fs, inner, _ = resolve_filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise ValueError(f"file not found: {path}")
    with fs.open_input_stream(inner) as f:
        try:
            return json.loads(f.read())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None


def _load_instructions(path: PathLike) -> dict[str, Any]:
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise ValueError(
            f"{path}: expected a MIMIC-IT instruction JSON {{'meta': ..., 'data': {{id: {{...}}}}}}"
        )
    return doc["data"]


def _load_train_config(path: PathLike) -> dict[str, list[str]]:
    doc = _read_json(path)
    if not isinstance(doc, dict) or not all(isinstance(v, list) for v in doc.values()):
        raise ValueError(f"{path}: expected an Otter train config JSON {{instruction id: [related ids]}}")
    return {str(k): [str(x) for x in v] for k, v in doc.items()}


def _instruction_problem(entry: Any) -> str | None:
    """Reason an instruction cannot become a turn, or None."""
    if not isinstance(entry, dict):
        return "malformed_instruction"
    instruction, answer = entry.get("instruction"), entry.get("answer")
    if not isinstance(instruction, str) or not instruction.strip():
        return "empty_instruction"
    if not isinstance(answer, str) or not answer.strip():
        return "empty_answer"
    return None


def _first_image_id(entry: dict[str, Any]) -> str | None:
    ids = entry.get("image_ids")
    if isinstance(ids, str):  # some MIMIC-IT subsets store a single id
        ids = [ids]
    if not isinstance(ids, list) or not ids or not isinstance(ids[0], str) or not ids[0]:
        return None
    return ids[0]


def _plan_samples(
    data: dict[str, Any],
    order: list[str],
    related: Mapping[str, list[str]],
    group_related: bool,
    stats: ConvertStats,
    rejects: _Rejects,
) -> list[_Plan]:
    """Decide the samples (and their turns) from the instruction texts alone, rejecting what is bad there."""
    problems: dict[str, str | None] = {}

    def problem(iid: str) -> str | None:
        if iid not in problems:
            problems[iid] = _instruction_problem(data[iid])
            if problems[iid] is not None:
                rejects.add(iid, problems[iid])
        return problems[iid]

    plans: list[_Plan] = []
    used: set[str] = set()
    for iid in order:
        if iid in used:  # already a turn of an earlier conversation (group_related) or a duplicate key
            continue
        used.add(iid)
        stats.num_instructions += 1
        if iid not in data:
            rejects.add(iid, "unknown_instruction", "id not in the instructions file")
            continue
        if problem(iid) is not None:
            continue
        image_id = _first_image_id(data[iid])
        if image_id is None:
            rejects.add(iid, "missing_image_id")
            continue
        turn_ids = [iid]
        if group_related:
            for rid in related.get(iid, []):
                if rid in used:
                    continue
                if rid not in data:
                    stats.num_missing_related += 1
                    continue
                used.add(rid)
                stats.num_instructions += 1
                if problem(rid) is None:
                    turn_ids.append(rid)
        turns = [(data[t]["instruction"], data[t]["answer"]) for t in turn_ids]
        plans.append(_Plan(sample_id=iid, image_id=image_id, turns=turns))
    return plans


def decode_base64_image(text: Any) -> bytes:
    """Standard or urlsafe base64 (padding optional, whitespace and a `data:` prefix tolerated) -> bytes."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("ascii", errors="replace")
    if not isinstance(text, str):
        raise ValueError(f"base64 value must be a string, got {type(text).__name__}")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())
    if not text:
        raise ValueError("empty base64 value")
    altchars = b"-_" if ("-" in text or "_" in text) else None
    if altchars is not None and ("+" in text or "/" in text):
        raise ValueError("base64 value mixes standard and urlsafe alphabets")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"invalid base64: {err}") from None


class ParquetImages:
    """Images parquet (MIMIC-IT `base64` column, indexed by image id) read in bounded memory.

    Pass 1 reads only the id column, one row group at a time, to find where each wanted image lives. Pass 2
    reads only the `base64` column of the row groups that hold wanted images, `batch_size` rows at a time with a
    buffered stream, so memory stays bounded even when a writer put the whole file in one row group.
    """

    def __init__(self, path: PathLike, batch_size: int = 16, buffer_size: int = 4 << 20) -> None:
        self.path = str(path)
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        with self._open() as pf:
            schema = pf.schema_arrow
        self.id_column = self._find_id_column(schema)
        if "base64" not in schema.names:
            raise ValueError(f"{path}: images parquet has no 'base64' column (columns: {schema.names})")

    def _open(self) -> pq.ParquetFile:
        return open_parquet_named(self.path, buffer_size=self.buffer_size, pre_buffer=False)

    def _find_id_column(self, schema: pa.Schema) -> str:
        if "image_id" in schema.names:
            return "image_id"
        # pandas `to_parquet` stores a named index as a column and an unnamed one as `__index_level_0__`; the
        # schema's pandas metadata says which (a RangeIndex is stored as metadata only and holds no ids).
        meta = schema.pandas_metadata or {}
        for col in meta.get("index_columns", []):
            if isinstance(col, str) and col in schema.names:
                return col
        raise ValueError(
            f"{self.path}: cannot find the image id column: expected 'image_id' or a pandas index column "
            f"(columns: {schema.names})"
        )

    def locate(self, wanted: Iterable[str]) -> dict[str, tuple[int, int]]:
        """image id -> (row group, row within it) for the wanted ids present; the first occurrence wins."""
        wanted = set(wanted)
        where: dict[str, tuple[int, int]] = {}
        with self._open() as pf:
            for group in range(pf.num_row_groups):
                ids = pf.read_row_group(group, columns=[self.id_column]).column(0).to_pylist()
                for row, image_id in enumerate(ids):
                    if image_id in wanted and image_id not in where:
                        where[image_id] = (group, row)
        return where

    def stream(self, where: Mapping[str, tuple[int, int]]) -> Iterator[tuple[str, Any]]:
        """Yield (image id, base64 value) for the located ids, in file order."""
        by_group: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
        for image_id, (group, row) in where.items():
            by_group[group][row].append(image_id)
        with self._open() as pf:
            for group in sorted(by_group):
                rows = by_group[group]
                offset = 0
                for batch in pf.iter_batches(
                    batch_size=self.batch_size, row_groups=[group], columns=["base64"]
                ):
                    values = batch.column(0)
                    for row in range(offset, offset + batch.num_rows):
                        for image_id in rows.get(row, ()):
                            yield image_id, values[row - offset].as_py()
                    offset += batch.num_rows


class JsonImages:
    """Legacy MIMIC-IT images JSON (image id -> base64). JSON cannot be streamed with the standard library, so
    this loads the file whole; prefer the parquet form for large image sets."""

    def __init__(self, path: PathLike) -> None:
        doc = _read_json(path)
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a JSON object of image id -> base64")
        self._images = doc

    def locate(self, wanted: Iterable[str]) -> dict[str, tuple[int, int]]:
        # Keeps the caller's order (the instruction order): this reader has no file order to follow.
        return {image_id: (0, 0) for image_id in wanted if image_id in self._images}

    def stream(self, where: Mapping[str, tuple[int, int]]) -> Iterator[tuple[str, Any]]:
        for image_id in where:
            yield image_id, self._images[image_id]


def _default_source(instructions: PathLike) -> str:
    stem = Path(str(instructions)).stem
    return stem.removesuffix("_instructions") or stem


def convert_mimicit(
    instructions: PathLike,
    images: PathLike,
    out_dir: PathLike | None,
    source: str | None = None,
    group_related: bool = False,
    train_config: PathLike | None = None,
    rows_per_group: int = 64,
    rows_per_file: int = 4096,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ConvertStats:
    """Convert one MIMIC-IT/Otter dataset to shards in `out_dir` (+ `out_dir/rejects.parquet`); `out_dir=None`
    validates only (same stats, nothing written).

    - `instructions`: `{"meta": ..., "data": {id: {"instruction", "answer", "image_ids", "rel_ins_ids"}}}`.
    - `images`: parquet with a `base64` column indexed by image id (column `image_id` or the pandas index), or
      the legacy JSON of image id -> base64 (standard or urlsafe). Only the first image of a sample is used.
    - `train_config`: Otter's `{id: [related ids]}`; when given, only its ids are used, in its order, and its
      lists replace `rel_ins_ids`.
    - `group_related`: an instruction and its related ones become one multi-turn conversation (every assistant
      turn supervised), and the related ones are not emitted again on their own.

    Rows are written in the row order of the images parquet (that is what keeps memory bounded; samples that
    share an image keep the instruction order), or in instruction order for the legacy JSON. Bad rows are
    rejected with a reason, counted, never fatal.
    """
    t0 = time.perf_counter()
    data = _load_instructions(instructions)
    source = source or _default_source(instructions)
    if train_config is not None:
        config = _load_train_config(train_config)
        order, related = list(config), config
    else:
        order = list(data)
        related = {
            iid: [str(r) for r in (e.get("rel_ins_ids") or [])] if isinstance(e, dict) else []
            for iid, e in data.items()
        }
    images_path = str(images)
    reader = JsonImages(images) if images_path.endswith(".json") else ParquetImages(images)

    stats = ConvertStats(format="mimicit")
    rejects = _Rejects(stats, source, str(instructions), data, None if train_config is None else str(train_config),
                       order)
    plans = _plan_samples(data, order, related, group_related, stats, rejects)
    by_image: dict[str, list[_Plan]] = defaultdict(list)
    for plan in plans:
        by_image[plan.image_id].append(plan)
    where = reader.locate(by_image)
    for image_id, waiting in by_image.items():
        if image_id not in where:
            for plan in waiting:
                rejects.add(plan.sample_id, "image_not_found", f"image id {image_id!r} not in {images_path}")
    writer = None
    if out_dir is not None:
        writer = ShardWriter(out_dir, rows_per_group=rows_per_group, rows_per_file=rows_per_file,
                             overwrite=overwrite)
    try:
        for image_id, value in reader.stream(where):
            image, reason, detail = _checked_image(value, max_pixels)
            for plan in by_image[image_id]:
                if reason is not None:
                    rejects.add(plan.sample_id, reason, f"image {image_id!r}: {detail}")
                    continue
                conversations = []
                for instruction, answer in plan.turns:
                    conversations += [{"role": "user", "text": instruction}, {"role": "assistant", "text": answer}]
                if writer is not None:
                    writer.write({"id": plan.sample_id, "image": image, "image_id": image_id,
                                  "conversations": conversations, "source": source})
                stats.num_samples += 1
                stats.num_turns += len(plan.turns)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    stats.num_records = stats.num_instructions
    stats.examples = list(rejects[:10])
    stats.seconds = time.perf_counter() - t0
    if writer is not None:
        writer.close()
        stats.files, stats.num_files, stats.out_dir = list(writer.files), len(writer.files), str(out_dir)
        stats.rejects_path = write_rejects(out_dir, rejects)
    return stats


def _checked_image(value: Any, max_pixels: int) -> tuple[bytes | None, str | None, str]:
    """(image bytes, reject reason or None, detail) of one base64 value. An empty value (or one that decodes to
    0 bytes) is `empty_image`, not `bad_base64`: the file holds the key but no picture."""
    if value is None or (isinstance(value, str | bytes) and not "".join(
            (value.decode("latin-1") if isinstance(value, bytes) else value).split())):
        return None, "empty_image", "no image bytes"
    try:
        image = decode_base64_image(value)
    except ValueError as err:
        return None, "bad_base64", str(err)
    if not image:
        return None, "empty_image", "no image bytes"
    try:
        check_image(image, max_pixels)
    except RecordError as err:
        return None, err.reason, err.detail
    return image, None, ""
