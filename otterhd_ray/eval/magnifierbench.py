"""MagnifierBench: loading, option parsing and the seed's prompt conventions.

An item's `instruction` reads `"<question>? A. <opt>, B. <opt>, C. <opt>, D. <opt>"` and `answer` is a letter.
Two questions are asked per item, as the seed does:
- multiple choice: `"{prompt} {instruction}"` (just the instruction without a prompt);
- free form: the question up to its "?" without the prompt, judged against the correct option's *text*.

Items are read from a local HF dataset directory (`data/<split>-*.parquet`), a parquet file or directory, or a
hub id when online. Items that cannot be evaluated (not exactly one image, unparsable options, an answer that
is not an option) are counted by reason and listed in the report, never dropped silently.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otterhd_ray.data.shards import open_parquet_named
from otterhd_ray.eval.config import BenchDatasetSpec

# An option marker: the letter, a dot and a space, at the start of the options or after ", ".
_OPTION_RE = re.compile(r"(?:^\s*|,\s*)([A-Z])\.\s")


@dataclass(frozen=True)
class BenchItem:
    id: str
    instruction: str
    answer: str  # the correct letter
    options: dict[str, str]  # letter -> option text, in order
    question: str  # the free-form question (up to and including "?")
    image: bytes  # encoded image as stored (JPEG / PNG)

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]


@dataclass
class LoadResult:
    items: list[BenchItem]
    num_rows: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    skipped_ids: dict[str, list[str]] = field(default_factory=dict)  # reason -> ids

    def skip(self, reason: str, item_id: str) -> None:
        self.skipped[reason] += 1
        self.skipped_ids.setdefault(reason, []).append(item_id)


def split_instruction(instruction: str) -> tuple[str, dict[str, str]]:
    """`"Q? A. x, B. y"` -> ("Q?", {"A": "x", "B": "y"}). Options must run A, B, C... in order.

    Splitting at the option markers (rather than at every comma, as the seed does) keeps option texts that
    contain commas or dots ("3.5 m", "red, white") whole.
    """
    qmark = instruction.find("?")
    head, tail = (instruction[: qmark + 1], instruction[qmark + 1 :]) if qmark >= 0 else ("", instruction)
    markers = [m for m in _OPTION_RE.finditer(tail)]
    letters = [m.group(1) for m in markers]
    expected = [chr(ord("A") + i) for i in range(len(letters))]
    if len(letters) < 2 or letters != expected:
        raise ValueError(f"no 'A. ..., B. ...' options in instruction {instruction!r}")
    options: dict[str, str] = {}
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(tail)
        options[m.group(1)] = tail[m.end() : end].strip().rstrip(",").strip()
    if not head.strip():
        raise ValueError(f"no question before the options in instruction {instruction!r}")
    return head.strip(), options


def mc_prompt(instruction: str, prompt: str) -> str:
    """The seed's multiple-choice question: prompt prepended with a space when there is one."""
    return f"{prompt} {instruction}" if prompt else instruction


def format_for_model(model_name: str, text: str) -> str:
    """The seed's per-model wrapping: `fuyu` takes the raw text, `otterhd` the chat template."""
    if model_name == "fuyu":
        return text
    if model_name == "otterhd":
        return f"User: {text} Assistant:"
    raise ValueError(f"unknown model name {model_name!r}; expected 'fuyu' or 'otterhd'")


def _image_bytes(image: Any) -> bytes | None:
    if isinstance(image, dict):
        data = image.get("bytes")
        if data:
            return bytes(data)
        path = image.get("path")
        if path and Path(path).is_file():
            return Path(path).read_bytes()
        return None
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if hasattr(image, "save"):  # a PIL image (the `datasets` library decodes Image features)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    return None


def to_item(row: dict[str, Any], result: LoadResult) -> BenchItem | None:
    """One dataset row -> an item, or None after counting why it was skipped."""
    item_id = str(row.get("id"))
    images = row.get("images") or []
    if len(images) != 1:
        result.skip("multi_image" if len(images) > 1 else "no_image", item_id)
        return None
    image = _image_bytes(images[0])
    if image is None:
        result.skip("unreadable_image", item_id)
        return None
    instruction = str(row.get("instruction") or "")
    try:
        question, options = split_instruction(instruction)
    except ValueError:
        result.skip("unparsable_options", item_id)
        return None
    answer = str(row.get("answer") or "").strip().upper()
    if answer not in options:
        result.skip("answer_not_an_option", item_id)
        return None
    return BenchItem(item_id, instruction, answer, options, question, image)


def _parquet_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    for pattern in (
        f"data/{split}-*.parquet",
        f"{split}-*.parquet",
        f"{split}/*.parquet",
        f"data/{split}/*.parquet",
    ):
        files = sorted(path.glob(pattern))
        if files:
            return files
    files = sorted(path.rglob("*.parquet"))
    if not files:
        raise ValueError(f"no parquet files for split {split!r} under {path}")
    return files


def _rows_from_parquet(files: list[Path]) -> Iterator[dict[str, Any]]:
    # Row group at a time: a benchmark with large images is never held twice in memory.
    for f in files:
        reader = open_parquet_named(f)  # a corrupt file: one line naming it, not an ArrowInvalid traceback
        for i in range(reader.num_row_groups):
            yield from reader.read_row_group(i).to_pylist()


def _rows_from_hub(spec: BenchDatasetSpec) -> Iterator[dict[str, Any]]:
    try:
        import datasets  # noqa: PLC0415 - optional: only for hub ids
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            ds = datasets.load_dataset(spec.data_path, split=spec.split, cache_dir=spec.cache_dir)
        except Exception as err:
            raise ValueError(
                f"could not load {spec.data_path!r} from the Hugging Face hub ({type(err).__name__}); "
                "offline? download it and set data_path to the local directory"
            ) from None
        try:
            # Keep images encoded: decoding to PIL and re-encoding would change JPEG bytes.
            ds = ds.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
        except Exception:  # noqa: BLE001 - another `datasets` version: PIL images are re-encoded as PNG
            pass
        yield from ds
        return
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415
    except ImportError:
        raise ValueError(
            f"{spec.data_path!r} is not a local path and neither `datasets` nor `huggingface_hub` is installed"
        ) from None
    try:
        local = snapshot_download(spec.data_path, repo_type="dataset", cache_dir=spec.cache_dir)
    except Exception as err:
        raise ValueError(
            f"could not download {spec.data_path!r} from the Hugging Face hub ({type(err).__name__}); "
            "offline? download it and set data_path to the local directory"
        ) from None
    yield from _rows_from_parquet(_parquet_files(Path(local), spec.split))


def load_magnifierbench(spec: BenchDatasetSpec) -> LoadResult:
    """All usable items of `spec` (first `max_items` if set) plus the counted skips."""
    path = Path(spec.data_path).expanduser()
    if path.exists():
        rows = _rows_from_parquet(_parquet_files(path, spec.split))
    elif spec.data_path.startswith((".", "/", "~")) or spec.data_path.count("/") != 1:
        raise ValueError(f"data_path {spec.data_path!r} does not exist and is not a hub id (owner/name)")
    else:
        rows = _rows_from_hub(spec)
    result = LoadResult(items=[])
    seen: set[str] = set()
    for row in rows:
        if spec.max_items and len(result.items) >= spec.max_items:
            break
        result.num_rows += 1
        item = to_item(row, result)
        if item is None:
            continue
        if item.id in seen:
            result.skip("duplicate_id", item.id)
            continue
        seen.add(item.id)
        result.items.append(item)
    return result
