"""Parquet shards: the sample schema, a writer and streaming readers.

A shard row is one training sample (DESIGN.md, "Data flow" 1)::

    id             string                                  unique sample id
    image          binary                                  encoded image bytes exactly as given (JPEG/PNG/...);
                                                           null: a text-only sample (no patches)
    image_id       string                                  id of the image in its source dataset
    conversations  list<struct<role: string, text: string>>  roles "user" / "assistant", alternating
    source         string                                  dataset name

Files are written with small row groups: Arrow binary arrays cap at 2 GiB and Ray Data reads one file as one
block, so neither a row group nor a file may grow without bound. Readers here stream one row group at a time and
never load a file whole. Paths may be local or any URI `pyarrow.fs.FileSystem.from_uri` understands
(`s3://`, `gs://`, `file://`).

The importers that write shards from other formats (MIMIC-IT, LLaVA, ShareGPT/alpaca, HF parquet) live in
`otterhd_ray.data.formats`.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


def list_shard_files(path: PathLike, exclude: Iterable[str] = ()) -> list[str]:
    """Resolve a shard directory, glob or single file (local or URI) to a sorted list of parquet files.

    A directory lists its own `*.parquet` files (not sub-directories), skipping hidden, `_`-prefixed, tmp and
    `rejects*.parquet` files. A glob (`*`, `?`, `[`) matches on the full path. Files listed in `exclude` (as
    returned here) are left out: `data.on_bad_file: skip` puts unreadable files there. Raises ValueError when
    nothing is found, so a typo in a config never trains on zero samples.
    """
    _, found, prefix = _list_files(path)
    skip = set(exclude)
    files = [prefix + p for p in found if prefix + p not in skip]
    if not files:
        raise ValueError(f"no usable parquet shard files at {path} (all {len(found)} excluded as bad files)")
    return files


def open_parquet_named(path: PathLike, **kwargs: Any) -> pq.ParquetFile:
    """`pq.ParquetFile` of `path` whose errors name the file: a corrupt or truncated parquet (Arrow says only
    "Parquet magic bytes not found") becomes one ValueError line `FILE: not a readable parquet file (...)`."""
    fs, inner, _ = resolve_filesystem(path)
    try:
        return pq.ParquetFile(fs.open_input_file(inner), **kwargs)
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None


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


def _open_files(paths: PathLike | Sequence[PathLike]) -> Iterator[pq.ParquetFile]:
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    for item in items:
        fs, found, prefix = _list_files(item)
        for inner in found:
            try:
                pf = pq.ParquetFile(fs.open_input_file(inner))
            except (pa.ArrowException, OSError) as err:
                raise ValueError(
                    f"{prefix}{inner}: not a readable parquet file ({type(err).__name__}: {err})"
                ) from None
            with pf:
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
