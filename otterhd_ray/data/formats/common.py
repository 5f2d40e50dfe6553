"""What every importer shares: the Fuyu layout rules, image loading, streaming readers, stats and the run loop.

A converter turns one input record into a *parsed record* (id, turns with their roles, image references); the
shared code then applies the Fuyu layout rules (docs/internals.md, "Importing other formats") and writes a shard
row, or a reject naming the input file and the record index:

1. `<image>` placeholders are removed from every turn, wherever they stood (start, end, mid-turn); Fuyu puts the
   image before all text, so where a placeholder stood carries no information.
2. Their count must equal the number of images (`image_count_mismatch` otherwise). Formats whose images come
   without placeholders (the_cauldron, HF datasets) may have zero placeholders for any number of images.
3. More than one image: `multi_image` (counted; multi-image samples are not implemented end to end).
4. No image: a text-only sample (shard `image` null; no patches in training).
5. A system turn is prepended to the first user turn (our shards have no system role); turns must then
   alternate user/assistant from the user and end with the assistant (`processor.validate_conversation`).
6. Images are copied as bytes; only their header is read (`images.image_size`): `image_not_found`,
   `empty_image` (0 bytes), `undecodable_image`, `image_too_large` (over the configured pixel limit).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otterhd_ray.data.conversation import validate_conversation
from otterhd_ray.data.images import BadSample, image_size
from otterhd_ray.data.rejects import reject_row
from otterhd_ray.data.shards import PathLike, ShardWriter, write_rejects

PLACEHOLDER = "<image>"
DEFAULT_MAX_PIXELS = 89_478_485  # data.max_image_pixels' default: the converter refuses what training would
_PLACEHOLDER_RE = re.compile(r"\s*<image>\s*")
USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "bot", "model"})
SYSTEM_ROLES = frozenset({"system"})
UNREADABLE_FILE = "unreadable_file"
MAX_EXAMPLES = 10


class RecordError(ValueError):
    """A record that cannot become a shard row; `reason` is the rejects table's reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ImageRef:
    """An image as a record names it: inline bytes (HF `datasets.Image`), or a path relative to `root`."""

    data: bytes | None = None
    path: str | None = None


@dataclass
class Parsed:
    """A record after its format's parser: turns as (role, text) with roles user/assistant/system."""

    id: str | None
    turns: list[tuple[str, str]]
    images: list[ImageRef]


# ------------------------------------------------------------------------------------------ stats
@dataclass
class ConvertStats:
    """What a conversion did; `str()` prints the summary table (accepted, rejected by reason)."""

    format: str = ""
    num_samples: int = 0
    num_rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    num_files: int = 0
    num_records: int = 0
    num_text_only: int = 0
    num_instructions: int = 0  # MIMIC-IT: instructions read (a sample may fold several)
    num_turns: int = 0
    num_missing_related: int = 0
    bad_files: list[str] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first rejects, for the report
    seconds: float = 0.0
    out_dir: str = ""
    files: list[str] = field(default_factory=list)
    rejects_path: str = ""

    def reject(self, reason: str) -> None:
        self.num_rejected += 1
        self.reasons[reason] += 1

    def merge(self, other: ConvertStats) -> None:
        """Add `other`'s counts (a parallel chunk) into this one."""
        for name in ("num_samples", "num_rejected", "num_records", "num_text_only", "num_instructions",
                     "num_turns", "num_missing_related"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reasons.update(other.reasons)
        self.bad_files += other.bad_files
        self.examples = (self.examples + other.examples)[:MAX_EXAMPLES]
        self.files += other.files
        self.num_files = len(self.files)

    @property
    def samples_per_s(self) -> float:
        return (self.num_samples + self.num_rejected) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "num_samples": self.num_samples,
            "num_rejected": self.num_rejected,
            "reasons": dict(sorted(self.reasons.items())),
            "num_records": self.num_records,
            "num_text_only": self.num_text_only,
            "num_files": self.num_files,
            "num_instructions": self.num_instructions,
            "num_turns": self.num_turns,
            "num_missing_related": self.num_missing_related,
            "bad_files": list(self.bad_files),
            "seconds": round(self.seconds, 3),
            "out_dir": self.out_dir,
            "rejects_path": self.rejects_path,
        }

    def __str__(self) -> str:
        head = f"format {self.format}: " if self.format else ""
        if self.num_instructions:
            head += f"converted {self.num_instructions} instructions -> "
        elif self.num_records:
            head += f"read {self.num_records} records -> "
        head += f"{self.num_samples} samples ({self.num_turns} turns)"
        if self.seconds:
            head += f" in {self.seconds:.1f} s ({self.samples_per_s:,.0f} records/s)"
        width = max([len("accepted"), *(len(r) + 2 for r in self.reasons)])
        lines = [head, f"{'accepted':<{width}}  {self.num_samples:>9}"]
        if self.num_text_only:
            lines.append(f"{'  text-only':<{width}}  {self.num_text_only:>9}")
        lines.append(f"{'rejected':<{width}}  {self.num_rejected:>9}")
        lines += [f"{'  ' + r:<{width}}  {n:>9}" for r, n in sorted(self.reasons.items(), key=lambda x: -x[1])]
        if self.num_missing_related:
            lines.append(f"related instruction ids not found (turns skipped): {self.num_missing_related}")
        for bad in self.bad_files:
            lines.append(f"unreadable input file: {bad}")
        if self.out_dir:
            lines.append(f"{self.num_files} shard file(s) under {self.out_dir}")
        if self.rejects_path:
            lines.append(f"rejects (with input file and record index) -> {self.rejects_path}")
        elif self.examples:
            lines.append("first rejects:")
            lines += [f"  {e['file']}:{e['record']} {e['reason']}: {e['detail']}" for e in self.examples]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ layout rules
def strip_placeholders(text: str) -> tuple[str, int]:
    """(text without `<image>` placeholders, how many there were). A placeholder and the blanks around it become
    one newline if they spanned one, else one space; the ends are stripped."""
    count = text.count(PLACEHOLDER)
    if not count:
        return text.strip(), 0
    out = _PLACEHOLDER_RE.sub(lambda m: "\n" if "\n" in m.group() else " ", text)
    return out.strip(), count


def fold_system(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """System turns are prepended (blank line between) to the next user turn: shards have no system role."""
    out: list[tuple[str, str]] = []
    pending: list[str] = []
    for role, text in turns:
        if role == "system":
            if text.strip():
                pending.append(text.strip())
            continue
        if role == "user" and pending:
            text = "\n\n".join([*pending, text])
            pending = []
        out.append((role, text))
    if pending:
        raise RecordError("bad_turn_order", "system turn with no user turn after it")
    return out


def apply_layout(parsed: Parsed, implicit_images: bool) -> list[dict[str, str]]:
    """The layout rules 1-3 and 5 (module doc): the shard `conversations` of `parsed`, or RecordError."""
    stripped = []
    placeholders = 0
    for role, text in parsed.turns:
        clean, n = strip_placeholders(text)
        placeholders += n
        stripped.append((role, clean))
    num_images = len(parsed.images)
    if placeholders != num_images and not (implicit_images and placeholders == 0):
        raise RecordError(
            "image_count_mismatch", f"{placeholders} {PLACEHOLDER} placeholder(s) but {num_images} image(s)"
        )
    if num_images > 1:
        raise RecordError("multi_image", f"{num_images} images (one image per sample is supported)")
    conversations = [{"role": r, "text": t} for r, t in fold_system(stripped)]
    try:
        validate_conversation(conversations)
    except BadSample as err:
        raise RecordError(err.reason, err.detail) from None
    return conversations


def normalise_role(role: Any, user: frozenset[str] = USER_ROLES, assistant: frozenset[str] = ASSISTANT_ROLES,
                   system: frozenset[str] = SYSTEM_ROLES) -> str:
    if isinstance(role, str):
        low = role.strip().lower()
        if role in user or low in user:
            return "user"
        if role in assistant or low in assistant:
            return "assistant"
        if role in system or low in system:
            return "system"
    raise RecordError("bad_role", f"role {role!r}")


# ------------------------------------------------------------------------------------------- images
def check_image(data: bytes, max_pixels: int) -> None:
    """Header-only check (no pixels decoded): RecordError `empty_image` / `undecodable_image` /
    `image_too_large` (the detail names `max_pixels`, the configured limit)."""
    try:
        image_size(data, max_pixels)
    except BadSample as err:
        raise RecordError(err.reason, err.detail) from None


def read_image(ref: ImageRef, root: str, max_pixels: int) -> tuple[bytes, str]:
    """(bytes, image id) of `ref`: inline bytes, else the file `root/path` read as bytes. Checked, not decoded."""
    if ref.data is not None:
        data, image_id = bytes(ref.data), ref.path or ""
    elif ref.path:
        path = ref.path if os.path.isabs(ref.path) else os.path.join(root, ref.path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise RecordError("image_not_found", f"no file {path}") from None
        except OSError as err:
            raise RecordError("image_not_found", f"{path}: {type(err).__name__}: {err}") from None
        image_id = ref.path
    else:
        raise RecordError("image_not_found", "image reference has neither bytes nor a path")
    check_image(data, max_pixels)
    return data, image_id


# ------------------------------------------------------------------------------------------ readers
def iter_json_records(path: PathLike) -> Iterator[tuple[int, Any]]:
    """(record index, record) of a JSON array file or a JSONL file, streamed in bounded memory.

    A JSON array is parsed with ijson (a streaming parser: a 1 GB file is never held whole); a JSONL line that
    is not JSON yields `RecordError("bad_json")` as its record so the caller rejects that line alone. A broken
    array raises ValueError naming the file and the record where parsing stopped (nothing after it is readable).
    """
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:].lstrip()
        if head.startswith(b"["):
            yield from _iter_json_array(f, path)
        else:
            yield from _iter_jsonl(f)


def _iter_json_array(f: Any, path: PathLike) -> Iterator[tuple[int, Any]]:
    import ijson

    count = 0
    try:
        for record in ijson.items(f, "item", use_float=True):
            yield count, record
            count += 1
    except ijson.common.JSONError as err:
        message = " ".join(str(err).split())
        raise ValueError(f"{path}: invalid JSON after {count} records: {message}") from None


def _iter_jsonl(f: Any) -> Iterator[tuple[int, Any]]:
    index = 0
    for line in f:
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except ValueError as err:
            yield index, RecordError("bad_json", f"line is not JSON: {err}")
        index += 1


# ---------------------------------------------------------------------------------------- converter
class Converter:
    """Base of the record importers: `records(path)` streams (index, raw record); `parse(raw, path)` returns a
    `Parsed` or raises RecordError. `convert_record` applies the shared rules and returns a shard row."""

    name = ""
    implicit_images = False  # images may come without placeholders (then they precede the text)

    def __init__(self, *, image_root: str | None = None, source: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        self.image_root = image_root
        self.source = source
        self.max_pixels = max_pixels

    def records(self, path: str) -> Iterator[tuple[int, Any]]:
        return iter_json_records(path)

    def parse(self, raw: Any, path: str) -> Parsed:
        raise NotImplementedError

    def root_for(self, path: str) -> str:
        """Where relative image paths of `path` resolve: `--image-root`, else the input file's directory."""
        return self.image_root or os.path.dirname(os.path.abspath(path))

    def source_for(self, path: str) -> str:
        return self.source or Path(path).stem

    def convert_record(self, raw: Any, path: str, index: int) -> dict[str, Any]:
        if isinstance(raw, RecordError):
            raise raw
        if not isinstance(raw, Mapping):
            raise RecordError("malformed_record", f"record is a {type(raw).__name__}, not an object")
        parsed = self.parse(raw, path)
        conversations = apply_layout(parsed, self.implicit_images)
        image = image_id = None
        if parsed.images:
            image, image_id = read_image(parsed.images[0], self.root_for(path), self.max_pixels)
        rid = parsed.id if parsed.id else f"{Path(path).stem}-{index:08d}"
        return {"id": rid, "image": image, "image_id": image_id or None, "conversations": conversations,
                "source": self.source_for(path)}


def record_id(raw: Mapping[str, Any], key: str = "id") -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    return str(value)


@dataclass
class Sink:
    """Where converted rows and rejects go (a ShardWriter, or nowhere for `validate`) plus the counts."""

    stats: ConvertStats
    writer: ShardWriter | None
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def accept(self, row: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(row)
        self.stats.num_samples += 1
        self.stats.num_turns += len(row["conversations"]) // 2
        self.stats.num_text_only += row["image"] is None

    def reject(self, rid: str | None, source: str, reason: str, detail: str, file: str, record: int) -> None:
        self.stats.reject(reason)
        row = reject_row(rid, source, reason, detail, file=file, record=record)
        self.rejects.append(row)
        if len(self.stats.examples) < MAX_EXAMPLES:
            self.stats.examples.append(row)


def _raw_id(raw: Any) -> str | None:
    if isinstance(raw, Mapping):
        for key in ("id", "sample_id", "question_id"):
            if raw.get(key) not in (None, ""):
                return str(raw[key])
    return None


def convert_file(converter: Converter, path: str, sink: Sink, progress: Any = None,
                 records: Iterator[tuple[int, Any]] | None = None) -> None:
    """Convert the records of one input file into `sink`. A file that cannot be read (or stops being
    readable) is named in `stats.bad_files` and in a reject `unreadable_file`; the conversion goes on."""
    source = converter.source_for(path)
    index = -1
    try:
        for index, raw in records if records is not None else converter.records(path):
            sink.stats.num_records += 1
            try:
                sink.accept(converter.convert_record(raw, path, index))
            except RecordError as err:
                sink.reject(_raw_id(raw), source, err.reason, err.detail, path, index)
            if progress is not None:
                progress.update(1)
    except (ValueError, OSError) as err:
        # A corrupt file (bad JSON array, unreadable parquet): named, counted, never a crash of the whole job.
        detail = str(err) if str(path) in str(err) else f"{path}: {err}"
        sink.stats.bad_files.append(detail)
        sink.reject(None, source, UNREADABLE_FILE, detail, path, index + 1)


def _progress(total: int | None, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=" samples", desc=desc, mininterval=1.0, smoothing=0.1)


def run_conversion(converter: Converter, inputs: Sequence[str], out_dir: PathLike | None, *,
                   overwrite: bool = False, progress: bool = False, rows_per_group: int = 64,
                   rows_per_file: int = 4096) -> ConvertStats:
    """Convert every input file with `converter` in this process. `out_dir=None` validates only: the same
    stats and reasons, nothing written."""
    stats = ConvertStats(format=converter.name)
    t0 = time.perf_counter()
    writer = None
    if out_dir is not None:
        writer = ShardWriter(out_dir, rows_per_group=rows_per_group, rows_per_file=rows_per_file,
                             overwrite=overwrite)
    sink = Sink(stats, writer)
    bar = _progress(None, progress, f"{converter.name}")
    try:
        for path in inputs:
            convert_file(converter, str(path), sink, bar)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t0
    if writer is not None:
        writer.close()
        stats.files, stats.num_files, stats.out_dir = list(writer.files), len(writer.files), str(out_dir)
        stats.rejects_path = write_rejects(out_dir, sink.rejects)
    return stats
