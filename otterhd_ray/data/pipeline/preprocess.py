"""Read + preprocess: a rank's micro-batches in read units, decoded, resized, patchified and tokenized.

A rank's micro-batches are grouped into read units (consecutive micro-batches, at least
`preprocess_batch_size` samples). A unit's payload (plain JSON) names every sample's file, row group and row, its
bucket and planned length; `preprocess_unit` reads the row groups it needs through a `RowGroupCache`, then
decodes (JPEG draft decoding when `data.draft_decode`), resizes, patchifies and tokenizes. With Ray initialised
and a CPU free this is a Ray Data `map_batches` over the units (tasks, `preprocess_concurrency`, order
preserved); otherwise the same function runs in-process. A row that fails here (e.g. a truncated JPEG whose
header was fine) becomes a row with `reason` set, never an exception.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from otterhd_ray.config import DataConfig
from otterhd_ray.data.pipeline.rejects import LENGTH_MISMATCH, PREPROCESS_ERROR
from otterhd_ray.data.pipeline.schedule import EpochSchedule
from otterhd_ray.data.pipeline.worker import processor_for
from otterhd_ray.data.rejects import DETAIL_MAX_CHARS
from otterhd_ray.data.shards import resolve_filesystem

if TYPE_CHECKING:
    from otterhd_ray.data.processor import FuyuProcessor

# The plan's window shuffle spreads a read unit over several row groups and each row group over several units;
# caching them makes each row group cost about one read per process and window instead of one per unit.
ROW_GROUP_CACHE_BYTES = 256 << 20


@dataclass(frozen=True)
class ReadUnit:
    """Consecutive micro-batches of one rank (positions `mbs`) preprocessed together."""

    unit: int
    mbs: list[int]


def read_units(schedule: EpochSchedule, rank: int, unit_samples: int) -> list[ReadUnit]:
    """Group a rank's micro-batches into read units of >= `unit_samples` samples. Boundaries depend only on
    the schedule (never on the resume position), so a unit's rejects file is always complete."""
    units: list[ReadUnit] = []
    current: list[int] = []
    count = 0
    for j, mb in enumerate(schedule.rank_micro_batches(rank)):
        current.append(j)
        count += len(mb)
        if count >= unit_samples:
            units.append(ReadUnit(len(units), current))
            current, count = [], 0
    if current:
        units.append(ReadUnit(len(units), current))
    return units


def unit_payload(schedule: EpochSchedule, rank: int, unit: ReadUnit, cfg: DataConfig,
                 tokenizer_dir: str) -> dict[str, Any]:
    """Everything a worker needs to preprocess one unit, as plain JSON-able values."""
    mbs = schedule.rank_micro_batches(rank)
    plan = schedule.plan
    samples = []
    for j in unit.mbs:
        for i in mbs[j].tolist():
            samples.append({
                "mb": j, "sample_index": i, "id": schedule.sample_id[i], "source": schedule.sample_source[i],
                "file": plan.files[plan.file[i]].path, "file_key": schedule.file_keys[plan.file[i]],
                "row_group": int(plan.row_group[i]), "row": int(plan.row[i]),
                "size": [int(x) for x in schedule.size_hw[i]], "length": int(schedule.length[i]),
            })
    return {
        "unit": unit.unit, "samples": samples, "tokenizer_dir": str(tokenizer_dir),
        "template": cfg.instruction_template, "max_pixels": cfg.max_image_pixels, "max_tokens": cfg.max_tokens,
        "draft": cfg.draft_decode,
    }


class RowGroupCache:
    """Row groups (image and conversation columns) read by one process, most recent last, bounded in bytes.
    `reads` counts reads from storage per (file key, row group): tests and diagnostics."""

    def __init__(self, max_bytes: int = ROW_GROUP_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.reads: Counter[tuple[str, int]] = Counter()
        self._tables: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()

    def get(self, path: str, file_key: str, row_group: int) -> pa.Table:
        key = (file_key, row_group)
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        fs, inner, _ = resolve_filesystem(path)
        with fs.open_input_file(inner) as handle:
            table = pq.ParquetFile(handle).read_row_group(row_group, columns=["image", "conversations"])
        self.reads[key] += 1
        self._tables[key] = table
        total = sum(t.nbytes for t in self._tables.values())
        while total > self.max_bytes and len(self._tables) > 1:
            _, old = self._tables.popitem(last=False)
            total -= old.nbytes
        return table


@lru_cache(maxsize=1)
def worker_row_group_cache() -> RowGroupCache:
    """The row-group cache of a Ray Data worker process. Each unit is a separate task call, but tasks reuse
    worker processes, and units of one shuffle window share row groups: a per-process cache (the one state
    kept between calls) reads each about once per worker instead of once per unit."""
    return RowGroupCache()


def _preprocess_sample(s: dict[str, Any], payload: dict[str, Any], processor: FuyuProcessor,
                       cache: RowGroupCache) -> dict[str, Any]:
    """The array columns of one sample's output row; raises `BadSample` for a bad one."""
    from otterhd_ray.data.images import BadSample, decode_image

    table = cache.get(s["file"], s["file_key"], s["row_group"])
    data = table.column("image")[s["row"]].as_py()
    conv = table.column("conversations")[s["row"]].as_py()
    size = tuple(s["size"])
    image = None if data is None else decode_image(  # null: a text-only sample
        data, payload["max_pixels"], draft_target=size if payload["draft"] else None
    )
    sample = processor.encode_conversation(image, conv, size=size)
    n = int(sample["num_tokens"])
    if n > s["length"]:  # the plan under-counted: the micro-batch could overflow; never truncate
        raise BadSample(LENGTH_MISMATCH, f"planned {s['length']} tokens, processor made {n}")
    return {
        "input_ids": sample["input_ids"].astype(np.int32).tobytes(),
        "labels": sample["labels"].astype(np.int32).tobytes(),
        "patches": np.ascontiguousarray(sample["patches"], dtype=np.uint8).tobytes(),
        "bucket_h": int(sample["bucket"][0]), "bucket_w": int(sample["bucket"][1]), "num_tokens": n,
    }


def preprocess_unit(payload: dict[str, Any], cache: RowGroupCache) -> list[dict[str, Any]]:
    """Read, decode, resize, patchify and tokenize one unit; one output row per sample, in unit order.

    A failing sample yields a row with `reason` set (and empty arrays) instead of raising."""
    from otterhd_ray.data.images import BadSample

    processor = processor_for(payload["tokenizer_dir"], payload["template"])
    out = []
    for s in payload["samples"]:
        row = {"unit": payload["unit"], "mb": s["mb"], "sample_index": s["sample_index"], "id": s["id"],
               "source": s["source"], "reason": "", "detail": "", "input_ids": b"", "labels": b"",
               "patches": b"", "bucket_h": 0, "bucket_w": 0, "num_tokens": 0}
        try:
            row.update(_preprocess_sample(s, payload, processor, cache))
        except BadSample as err:
            row.update(reason=err.reason, detail=err.detail[:DETAIL_MAX_CHARS])
        except Exception as err:  # never let one row kill a long job; it is counted as a reject instead
            row.update(reason=PREPROCESS_ERROR, detail=f"{type(err).__name__}: {err}"[:DETAIL_MAX_CHARS])
        out.append(row)
    return out


def _ray_preprocess_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` UDF: a batch of JSON-encoded unit payloads -> their sample rows."""
    cache = worker_row_group_cache()
    rows = [r for text in batch["payload"] for r in preprocess_unit(json.loads(text), cache)]
    columns = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    return {k: np.array(v, dtype=object) if isinstance(v[0], (bytes, str)) else np.asarray(v)
            for k, v in columns.items()}


def iter_rows_ray(payloads: list[dict[str, Any]], cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """The units' rows, preprocessed by Ray Data tasks, in unit order."""
    import ray

    items = [{"payload": json.dumps(p)} for p in payloads]
    concurrency = cfg.preprocess_concurrency or max(1, min(4, int(ray.available_resources().get("CPU", 1)) - 1))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _ray_preprocess_batch,
        batch_size=1,
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=concurrency),
    )
    # Per-dataset context (a copy): keeps rows in unit order, which bounds the assembly buffer to about one
    # unit, without changing the process-wide DataContext other pipelines use.
    ds.context.execution_options.preserve_order = True
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        keys = list(batch)
        for k in range(len(batch[keys[0]])):
            yield {key: batch[key][k] for key in keys}


def iter_rows_local(payloads: list[dict[str, Any]], cache: RowGroupCache) -> Iterator[dict[str, Any]]:
    """The units' rows, preprocessed in this process, in unit order."""
    for payload in payloads:
        yield from preprocess_unit(payload, cache)
