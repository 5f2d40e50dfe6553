"""Parquet shards: the sample schema, a writer, streaming readers and the MIMIC-IT/Otter converter.

A shard row is one training sample (DESIGN.md, "Data flow" 1)::

    id             string                                  unique sample id
    image          binary                                  encoded image bytes exactly as given (JPEG/PNG/...)
    image_id       string                                  id of the image in its source dataset
    conversations  list<struct<role: string, text: string>>  roles "user" / "assistant", alternating
    source         string                                  dataset name

Files are written with small row groups: Arrow binary arrays cap at 2 GiB and Ray Data reads one file as one
block, so neither a row group nor a file may grow without bound. Readers here stream one row group at a time and
never load a file whole. Paths may be local or any URI `pyarrow.fs.FileSystem.from_uri` understands
(`s3://`, `gs://`, `file://`).

`convert_mimicit` turns the MIMIC-IT/Otter format (instruction JSON + images parquet with a `base64` column, or
the legacy JSON of image id -> base64) into shards, streaming the images so a 10 GB images file converts in
bounded memory. Bad rows are rejected with a reason into `out_dir/rejects.parquet`, never a crash.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import io
import json
import posixpath
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from otterhd_ray.data.rejects import REJECTS_FILE, rejects_table

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("image_id", pa.string()),
        pa.field(
            "conversations",
            pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("text", pa.string())])),
        ),
        pa.field("source", pa.string()),
    ]
)
ROLES = ("user", "assistant")

PathLike = str | Path


# ------------------------------------------------------------------------------------------ file systems
def resolve_filesystem(path: PathLike) -> tuple[pafs.FileSystem, str, str]:
    """`path` -> (file system, path inside it, URI prefix to turn an inner path back into a usable path).

    Plain paths (relative or absolute) are local; anything with a scheme goes through `FileSystem.from_uri`.
    """
    text = str(path)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute()), ""
    fs, inner = pafs.FileSystem.from_uri(text)
    scheme = text.split("://", 1)[0]
    prefix = "" if scheme == "file" else f"{scheme}://"
    return fs, inner, prefix


def _is_shard_name(name: str) -> bool:
    # Hidden, underscore (Hive/Spark markers) and tmp files are never shards; the converter's rejects table sits
    # beside its shards but has another schema, so a directory listing must skip it.
    return (
        name.endswith(".parquet")
        and not name.startswith((".", "_"))
        and not name.startswith(REJECTS_FILE.removesuffix(".parquet"))
    )


def list_shard_files(path: PathLike) -> list[str]:
    """Resolve a shard directory, glob or single file (local or URI) to a sorted list of parquet files.

    A directory lists its own `*.parquet` files (not sub-directories), skipping hidden, `_`-prefixed, tmp and
    `rejects*.parquet` files. A glob (`*`, `?`, `[`) matches on the full path. Raises ValueError when nothing is
    found, so a typo in a config never trains on zero samples.
    """
    _, found, prefix = _list_files(path)
    return [prefix + p for p in found]


def _list_files(path: PathLike) -> tuple[pafs.FileSystem, list[str], str]:
    """(file system, sorted inner paths, URI prefix); the readers reuse the file system, so an object store
    is resolved (credentials, bucket region) once per path given, not once per file."""
    fs, inner, prefix = resolve_filesystem(path)
    if any(ch in inner for ch in "*?["):
        first = min(inner.find(ch) for ch in "*?[" if ch in inner)
        base = posixpath.dirname(inner[:first]) or "/"
        recursive = "/" in inner[first:]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=recursive, allow_not_found=True))
        found = [
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and fnmatch.fnmatchcase(i.path, inner)
            and _is_shard_name(i.base_name)
        ]
    else:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.File:
            found = [inner]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
            found = [i.path for i in infos if i.type == pafs.FileType.File and _is_shard_name(i.base_name)]
        else:
            raise ValueError(f"shard path not found: {path}")
    if not found:
        raise ValueError(f"no parquet shard files at {path}")
    return fs, sorted(found), prefix


def _publish(fs: pafs.FileSystem, tmp: str, final: str) -> None:
    """Make a finished tmp file visible under its final name, all at once.

    Locally that is a rename. Object stores have no rename (Arrow's GCS `move` is not implemented; S3's is a
    copy) but a server-side copy publishes the object only once it is complete, so readers never see half of it.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(tmp, final)
    else:
        fs.copy_file(tmp, final)
        fs.delete_file(tmp)


def _open_parquet(path: str, **kwargs: Any) -> pq.ParquetFile:
    fs, inner, _ = resolve_filesystem(path)
    return pq.ParquetFile(fs.open_input_file(inner), **kwargs)


def _open_files(paths: PathLike | Sequence[PathLike]) -> Iterator[pq.ParquetFile]:
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    for item in items:
        fs, found, _ = _list_files(item)
        for inner in found:
            with pq.ParquetFile(fs.open_input_file(inner)) as pf:
                yield pf


def count_rows(paths: PathLike | Sequence[PathLike]) -> int:
    """Number of rows in the given files/directories/globs, read from parquet footers only."""
    return sum(pf.metadata.num_rows for pf in _open_files(paths))


def iter_shard_rows(
    path_or_dir: PathLike | Sequence[PathLike], columns: list[str] | None = None
) -> Iterator[dict]:
    """Yield rows as dicts, reading one row group at a time (memory bounded by the largest row group)."""
    for pf in _open_files(path_or_dir):
        for group in range(pf.num_row_groups):
            yield from pf.read_row_group(group, columns=columns).to_pylist()


# ------------------------------------------------------------------------------------------------ writer
def _check_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Type-level validation only: semantically bad rows (undecodable image, empty answer) are legal shard
    rows on purpose; the preprocessing stage rejects them with a reason. What Arrow could not store, or a role
    outside the contract, is a programming error of the producer."""
    if not isinstance(row, Mapping):
        raise ValueError(f"shard row must be a mapping, got {type(row).__name__}")
    unknown = set(row) - set(SHARD_SCHEMA.names)
    if unknown:
        raise ValueError(f"shard row has unknown fields {sorted(unknown)}; schema: {SHARD_SCHEMA.names}")
    rid = row.get("id")
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"shard row needs a non-empty string id, got {rid!r}")
    image = row.get("image")
    if image is not None and not isinstance(image, bytes | bytearray | memoryview):
        raise ValueError(f"row {rid}: image must be bytes or None, got {type(image).__name__}")
    for key in ("image_id", "source"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"row {rid}: {key} must be a string or None, got {type(row[key]).__name__}")
    conversations = row.get("conversations")
    if conversations is not None:
        if not isinstance(conversations, list | tuple):
            raise ValueError(f"row {rid}: conversations must be a list, got {type(conversations).__name__}")
        for turn in conversations:
            if not isinstance(turn, Mapping) or set(turn) != {"role", "text"}:
                raise ValueError(f"row {rid}: each turn must be {{'role', 'text'}}, got {turn!r}")
            if turn["role"] not in ROLES:
                raise ValueError(f"row {rid}: role must be one of {ROLES}, got {turn['role']!r}")
            if turn["text"] is not None and not isinstance(turn["text"], str):
                raise ValueError(f"row {rid}: turn text must be a string, got {type(turn['text']).__name__}")
    return {
        "id": rid,
        "image": bytes(image) if image is not None else None,
        "image_id": row.get("image_id"),
        "conversations": [dict(t) for t in conversations] if conversations is not None else None,
        "source": row.get("source"),
    }


class ShardWriter:
    """Write shard rows into `out_dir/{prefix}-00000.parquet`, `-00001`, ... with small row groups.

    A file is written under a hidden tmp name and renamed only when complete, so a crash never leaves a
    half-written file that a reader would take for a shard. Leaving the `with` block on an exception deletes the
    unfinished file (finished files stay: each is complete on its own). Existing `{prefix}-*.parquet` files are
    an error unless `overwrite=True`, which deletes them first, so a re-run never mixes old and new shards.
    """

    def __init__(
        self,
        out_dir: PathLike,
        prefix: str = "shard",
        rows_per_group: int = 64,
        rows_per_file: int = 4096,
        max_group_bytes: int = 256 << 20,
        max_file_bytes: int = 1 << 30,
        overwrite: bool = False,
    ) -> None:
        if min(rows_per_group, rows_per_file, max_group_bytes, max_file_bytes) <= 0:
            raise ValueError(
                "rows_per_group, rows_per_file, max_group_bytes and max_file_bytes must be positive"
            )
        if not prefix or "/" in prefix or prefix.startswith((".", "_")):
            raise ValueError(f"bad shard prefix {prefix!r}")
        self.fs, self.dir, self._uri_prefix = resolve_filesystem(out_dir)
        self.prefix = prefix
        self.rows_per_group = rows_per_group
        self.rows_per_file = rows_per_file
        self.max_group_bytes = max_group_bytes
        self.max_file_bytes = max_file_bytes
        self.files: list[str] = []
        self.num_rows = 0
        self._buffer: list[dict[str, Any]] = []
        self._buffer_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._stream: Any = None
        self._tmp_path: str | None = None
        self._file_rows = 0
        self._file_bytes = 0
        self._closed = False
        self.fs.create_dir(self.dir, recursive=True)
        self._clear_existing(overwrite)

    def _clear_existing(self, overwrite: bool) -> None:
        infos = self.fs.get_file_info(pafs.FileSelector(self.dir, recursive=False))
        ours = [i for i in infos if fnmatch.fnmatchcase(i.base_name, f"{self.prefix}-*.parquet")]
        stale_tmp = [i for i in infos if fnmatch.fnmatchcase(i.base_name, f".{self.prefix}-*.parquet.tmp")]
        if ours and not overwrite:
            raise ValueError(
                f"{self._uri_prefix}{self.dir} already holds {len(ours)} '{self.prefix}-*.parquet' shard(s); "
                "choose another output directory or overwrite"
            )
        for info in ours + stale_tmp:
            self.fs.delete_file(info.path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, row: Mapping[str, Any]) -> None:
        if self._closed:
            raise ValueError("ShardWriter is closed")
        clean = _check_row(row)
        self._buffer.append(clean)
        self._buffer_bytes += len(clean["image"] or b"") + sum(
            len(t.get("text") or "") for t in clean["conversations"] or []
        )
        # A group also ends where the current file ends, so groups never straddle two files.
        room = self.rows_per_file - self._file_rows
        if len(self._buffer) >= min(self.rows_per_group, room) or self._buffer_bytes >= self.max_group_bytes:
            self._flush_group()

    def write_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def _flush_group(self) -> None:
        # write() flushes before the buffer outgrows the room left in the file, so this is one row group.
        if not self._buffer:
            return
        assert len(self._buffer) <= self.rows_per_file - self._file_rows
        if self._writer is None:
            self._open_file()
        table = pa.Table.from_pylist(self._buffer, schema=SHARD_SCHEMA)
        self._writer.write_table(table, row_group_size=len(self._buffer))
        self._file_rows += len(self._buffer)
        self._file_bytes += self._buffer_bytes
        self.num_rows += len(self._buffer)
        self._buffer, self._buffer_bytes = [], 0
        # Ray Data reads one file as one block: cap files by bytes too, not only by rows.
        if self._file_rows >= self.rows_per_file or self._file_bytes >= self.max_file_bytes:
            self._finish_file()

    def _open_file(self) -> None:
        index = len(self.files)
        self._tmp_path = f"{self.dir}/.{self.prefix}-{index:05d}.parquet.tmp"
        self._stream = self.fs.open_output_stream(self._tmp_path)
        self._writer = pq.ParquetWriter(
            self._stream,
            SHARD_SCHEMA,
            # Statistics/dictionaries of the image column would copy image bytes into the footer for nothing.
            use_dictionary=["source", "conversations.list.element.role"],
            write_statistics=["id", "image_id", "source"],
        )
        self._file_rows = self._file_bytes = 0

    def _finish_file(self) -> None:
        assert self._writer is not None and self._tmp_path is not None
        self._writer.close()
        self._stream.close()
        final = f"{self.dir}/{self.prefix}-{len(self.files):05d}.parquet"
        _publish(self.fs, self._tmp_path, final)
        self.files.append(self._uri_prefix + final)
        self._writer = self._stream = self._tmp_path = None
        self._file_rows = self._file_bytes = 0

    def close(self) -> None:
        """Flush buffered rows and finalise the last file."""
        if self._closed:
            return
        self._flush_group()
        if self._writer is not None:
            self._finish_file()
        self._closed = True

    def abort(self) -> None:
        """Drop buffered rows and delete the unfinished file; finished files are left as they are."""
        self._buffer = []
        if self._writer is not None:
            try:
                self._writer.close()
                self._stream.close()
            finally:
                self.fs.delete_file(self._tmp_path)
                self._writer = self._stream = self._tmp_path = None
        self._closed = True


def write_rejects(out_dir: PathLike, rejects: Sequence[Mapping[str, str]], name: str = REJECTS_FILE) -> str:
    """Write rejects rows (`data.rejects` schema; missing columns null) to `out_dir/name` atomically; returns the file path."""
    fs, inner, uri_prefix = resolve_filesystem(out_dir)
    fs.create_dir(inner, recursive=True)
    table = rejects_table(rejects)
    tmp, final = f"{inner}/.{name}.tmp", f"{inner}/{name}"
    with fs.open_output_stream(tmp) as stream:
        pq.write_table(table, stream)
    _publish(fs, tmp, final)
    return uri_prefix + final


# ----------------------------------------------------------------------------------------- converter
@dataclass
class ConvertStats:
    """What `convert_mimicit` did; `str()` prints a short report."""

    num_samples: int = 0
    num_rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    num_files: int = 0
    num_instructions: int = 0
    num_turns: int = 0
    num_missing_related: int = 0
    out_dir: str = ""
    files: list[str] = field(default_factory=list)
    rejects_path: str = ""

    def reject(self, reason: str) -> None:
        self.num_rejected += 1
        self.reasons[reason] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "num_rejected": self.num_rejected,
            "reasons": dict(sorted(self.reasons.items())),
            "num_files": self.num_files,
            "num_instructions": self.num_instructions,
            "num_turns": self.num_turns,
            "num_missing_related": self.num_missing_related,
            "out_dir": self.out_dir,
            "rejects_path": self.rejects_path,
        }

    def __str__(self) -> str:
        lines = [
            f"converted {self.num_instructions} instructions -> {self.num_samples} samples "
            f"({self.num_turns} turns) in {self.num_files} shard file(s) under {self.out_dir}",
            f"rejected {self.num_rejected}" + (f" -> {self.rejects_path}" if self.rejects_path else ""),
        ]
        lines += [f"  {reason}: {n}" for reason, n in sorted(self.reasons.items())]
        if self.num_missing_related:
            lines.append(f"related instruction ids not found (turns skipped): {self.num_missing_related}")
        return "\n".join(lines)


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
    rejects: list[dict[str, str]],
    source: str,
) -> list[_Plan]:
    """Decide the samples (and their turns) from the instruction texts alone, rejecting what is bad there."""
    problems: dict[str, str | None] = {}

    def problem(iid: str) -> str | None:
        if iid not in problems:
            problems[iid] = _instruction_problem(data[iid])
            if problems[iid] is not None:
                stats.reject(problems[iid])
                rejects.append({"id": iid, "source": source, "reason": problems[iid]})
        return problems[iid]

    plans: list[_Plan] = []
    used: set[str] = set()
    for iid in order:
        if iid in used:  # already a turn of an earlier conversation (group_related) or a duplicate key
            continue
        used.add(iid)
        stats.num_instructions += 1
        if iid not in data:
            stats.reject("unknown_instruction")
            rejects.append({"id": iid, "source": source, "reason": "unknown_instruction"})
            continue
        if problem(iid) is not None:
            continue
        image_id = _first_image_id(data[iid])
        if image_id is None:
            stats.reject("missing_image_id")
            rejects.append({"id": iid, "source": source, "reason": "missing_image_id"})
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


def _image_problem(data: bytes) -> str | None:
    """Cheap header-only check (PIL reads no pixels here) so rubbish never becomes a shard row."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.size  # noqa: B018 - header parsed
    except Image.DecompressionBombError:
        return "decompression_bomb"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return "undecodable_image"
    return None


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
        return _open_parquet(self.path, buffer_size=self.buffer_size, pre_buffer=False)

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
    out_dir: PathLike,
    source: str | None = None,
    group_related: bool = False,
    train_config: PathLike | None = None,
    rows_per_group: int = 64,
    rows_per_file: int = 4096,
    overwrite: bool = False,
) -> ConvertStats:
    """Convert one MIMIC-IT/Otter dataset to shards in `out_dir` (+ `out_dir/rejects.parquet`).

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

    stats = ConvertStats()
    rejects: list[dict[str, str]] = []
    plans = _plan_samples(data, order, related, group_related, stats, rejects, source)
    by_image: dict[str, list[_Plan]] = defaultdict(list)
    for plan in plans:
        by_image[plan.image_id].append(plan)
    where = reader.locate(by_image)
    for image_id, waiting in by_image.items():
        if image_id not in where:
            for plan in waiting:
                stats.reject("image_not_found")
                rejects.append({"id": plan.sample_id, "source": source, "reason": "image_not_found"})

    with ShardWriter(
        out_dir, rows_per_group=rows_per_group, rows_per_file=rows_per_file, overwrite=overwrite
    ) as w:
        for image_id, value in reader.stream(where):
            try:
                image = decode_base64_image(value)
                reason = _image_problem(image)
            except ValueError:
                reason = "bad_base64"
            for plan in by_image[image_id]:
                if reason is not None:
                    stats.reject(reason)
                    rejects.append({"id": plan.sample_id, "source": source, "reason": reason})
                    continue
                conversations = []
                for instruction, answer in plan.turns:
                    conversations += [
                        {"role": "user", "text": instruction},
                        {"role": "assistant", "text": answer},
                    ]
                w.write(
                    {
                        "id": plan.sample_id,
                        "image": image,
                        "image_id": image_id,
                        "conversations": conversations,
                        "source": source,
                    }
                )
                stats.num_samples += 1
                stats.num_turns += len(plan.turns)
    stats.files = list(w.files)
    stats.num_files = len(w.files)
    stats.out_dir = str(out_dir)
    stats.rejects_path = write_rejects(out_dir, rejects)
    return stats
