"""The length index: per shard row, the displayed image size (from the header, no pixel decoding), the number of
text tokens and, for a bad row, the reject reason (`missing_id`, `missing_image`, `empty_image`,
`undecodable_image`, `image_too_large`, conversation problems, `preprocess_error`).

Built once per shard file and cached as parquet in `data.index_cache_dir`, keyed by the file's path, size and
mtime, the tokenizer files, the template and the pixel limit. Multi-node: point the cache at a shared file
system, or each node builds its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from otterhd_ray.config import DataConfig
from otterhd_ray.data.pipeline.rejects import PREPROCESS_ERROR
from otterhd_ray.data.pipeline.worker import processor_for, ray_ready
from otterhd_ray.data.rejects import DETAIL_MAX_CHARS
from otterhd_ray.data.shards import resolve_filesystem

if TYPE_CHECKING:
    from otterhd_ray.data.processor import FuyuProcessor

INDEX_VERSION = 1
INDEX_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("text_tokens", pa.int32()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)
_READ_COLUMNS = ["id", "image", "conversations", "source"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------------------------- one row
def _cell(columns: dict[str, pa.ChunkedArray], name: str, i: int) -> Any:
    return columns[name][i].as_py() if name in columns else None


def _index_row(
    columns: dict[str, pa.ChunkedArray], i: int, processor: FuyuProcessor, max_pixels: int
) -> tuple[int, int, int, str, str]:
    """(height, width, text tokens, reason, detail) of row `i`; a bad row gives its reason instead of raising."""
    from otterhd_ray.data.images import BadSample, image_size

    h = w = 0
    try:
        rid = _cell(columns, "id", i)
        if not isinstance(rid, str) or not rid:
            raise BadSample("missing_id", "row has no id")
        if "image" not in columns:
            raise BadSample("missing_image", "the file has no image column")
        image = _cell(columns, "image", i)
        if image is not None:  # null: a text-only sample, size 0x0 (no patches)
            h, w = image_size(image, max_pixels)
        return h, w, processor.num_text_tokens(_cell(columns, "conversations", i)), "", ""
    except BadSample as err:
        return h, w, 0, err.reason, err.detail
    except Exception as err:  # a bug or an exotic row must not stop the index; it is a reject
        return h, w, 0, PREPROCESS_ERROR, f"{type(err).__name__}: {err}"


def index_file(path: str, tokenizer_dir: str, template: str, max_pixels: int) -> pa.Table:
    """The index of one shard file (`INDEX_SCHEMA`, one row per file row), read one row group at a time.
    Header-level checks only: pixels are decoded later, in preprocessing. A row without an id is listed under
    the placeholder id `<file name>:<row>`."""
    processor = processor_for(tokenizer_dir, template)
    out: dict[str, list[Any]] = {name: [] for name in INDEX_SCHEMA.names}
    fs, inner, _ = resolve_filesystem(path)
    base = Path(inner).name
    with fs.open_input_file(inner) as handle:
        pf = pq.ParquetFile(handle)
        names = [c for c in _READ_COLUMNS if c in pf.schema_arrow.names]
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=names)
            columns = {c: table.column(c) for c in names}
            for i in range(table.num_rows):
                rid, source = _cell(columns, "id", i), _cell(columns, "source", i)
                h, w, text, reason, detail = _index_row(columns, i, processor, max_pixels)
                out["id"].append(rid if isinstance(rid, str) and rid else f"{base}:{len(out['id'])}")
                out["source"].append(source if isinstance(source, str) else "")
                out["height"].append(h)
                out["width"].append(w)
                out["text_tokens"].append(text)
                out["reason"].append(reason)
                out["detail"].append(detail[:DETAIL_MAX_CHARS])
    return pa.Table.from_pydict(out, schema=INDEX_SCHEMA)


# ------------------------------------------------------------------------------------------- the cache
@lru_cache(maxsize=8)
def _tokenizer_fingerprint(tokenizer_dir: str) -> str:
    # Hashed once per process: every shard file's key needs it, and a tokenizer does not change under a run.
    h = hashlib.sha1()
    for name in _TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            h.update(name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _index_key(path: str, cfg: DataConfig, tokenizer_dir: str) -> str:
    fs, inner, _ = resolve_filesystem(path)
    info = fs.get_file_info(inner)
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    blob = json.dumps(
        [INDEX_VERSION, path, info.size, mtime, _tokenizer_fingerprint(tokenizer_dir),
         cfg.instruction_template, cfg.max_image_pixels]
    )
    return hashlib.sha1(blob.encode()).hexdigest()


def _cache_dir(cfg: DataConfig) -> Path:
    base = cfg.index_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "otterhd_ray", "index")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write_local(table: pa.Table, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)  # concurrent builders (several ranks) write identical files; last rename wins
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_index(
    cfg: DataConfig, tokenizer_dir: str, files: Sequence[str]
) -> tuple[list[pa.Table], list[str]]:
    """(index tables, file keys) for `files`, from the cache or built (in Ray tasks when Ray is up and several
    are missing). A file's key changes with its size, mtime and everything else the index depends on."""
    cache = _cache_dir(cfg)
    keys = [_index_key(p, cfg, tokenizer_dir) for p in files]
    tables: list[pa.Table | None] = [None] * len(files)
    missing = []
    for i, key in enumerate(keys):
        path = cache / f"{key}.parquet"
        if path.is_file():
            tables[i] = pq.read_table(path)
        else:
            missing.append(i)
    args = (str(tokenizer_dir), cfg.instruction_template, cfg.max_image_pixels)
    if len(missing) > 1 and ray_ready():
        import ray

        remote = ray.remote(num_cpus=1)(index_file)
        built = ray.get([remote.remote(files[i], *args) for i in missing])
    else:
        built = [index_file(files[i], *args) for i in missing]
    for i, table in zip(missing, built, strict=True):
        _atomic_write_local(table, cache / f"{keys[i]}.parquet")
        tables[i] = table
    return tables, keys  # type: ignore[return-value]
