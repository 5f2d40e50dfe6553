"""The training input pipeline: shards -> preprocessed samples -> packed micro-batches, one iterator per rank.

API (called from a Ray Train worker and from plain pytest alike)::

    it = build_train_iterator(cfg.data, tokenizer_dir, rank, world_size, epoch, start_position=0)
    it.num_micro_batches        # the same on every rank, known before the first batch
    for mb in it:               # torch tensors, docs/internals.md "Packed micro-batch", plus:
        mb["position"]          #   index of this micro-batch on this rank in this epoch (save position + 1)
        mb["is_filler"]         #   True: a 3-token batch with zero supervised tokens (keeps ranks in step)
    it.stats                    # PipelineStats of what this iterator yielded; print(format_stats(it.stats))

    epoch_num_micro_batches(cfg.data, tokenizer_dir, world_size, epoch)   # to size LR schedules
    prepare_index(cfg.data, tokenizer_dir)                                # optional: warm the cache on the driver

How it works (and why):

1. **Length index** (once per shard file, cached in `data.index_cache_dir`): for every row, the displayed image
   size from its header (no pixel decoding), the number of text tokens and, for a bad row, the reject reason
   (`missing_id`, `missing_image`, `empty_image`, `undecodable_image`, `image_too_large`, conversation problems).
   Keyed by the file's path, size and mtime, the tokenizer files, the template and the pixel limit.
2. **Epoch schedule** (cheap, every rank computes the same one): the footer-only plan of `mix.py` gives the
   sample order; each sample's bucket is drawn from (seed, epoch, sample_index); its token count is then known
   exactly (image rows x (cols + 1) + text) without decoding anything, so the *whole epoch* is packed up front.
   Samples over `max_tokens` are rejected here (`too_long`). The micro-batch list is cut into `world_size`
   contiguous blocks of `ceil(B / world_size)`; a shorter block is completed with filler micro-batches.
   Hence every rank yields the same number of micro-batches (DeepSpeed hangs otherwise, ray#66085), and every
   accepted sample is in exactly one micro-batch of exactly one rank.
3. **Read + preprocess**: a rank's micro-batches are grouped into read units (consecutive micro-batches, at
   least `preprocess_batch_size` samples); a unit reads the row groups it needs (through a byte-bounded
   per-process cache, so a row group is read about once per worker and shuffle window), then decodes (JPEG draft
   decoding when `data.draft_decode`), resizes, patchifies and tokenizes. With Ray initialised and a CPU free
   this is a Ray Data `map_batches` over the units (tasks, `preprocess_concurrency`, order preserved); otherwise
   the same function runs in-process. A row that fails here (e.g. a truncated JPEG whose header was fine)
   becomes a reject; its micro-batch is assembled without it, or replaced by a filler if nothing is left, so
   the count never changes.
4. **Resume**: `position` = number of micro-batches this rank consumed in `epoch` (equal on all ranks at a step
   boundary). `start_position=p` skips micro-batches < p without reading them, except those sharing a read
   unit with p: they are decoded again, not yielded, so that unit's rejects file is rewritten whole. Nothing is
   skipped or repeated, and the stats count only what this iterator yielded.

Yielded micro-batches also carry `epoch`, `position`, `is_filler` and `sample_id` (list of str). The `source` of
a sample (stats, rejects) is the name of its mix entry. Cost: scheduling 200k samples took 3.7 s on this 2-CPU
sandbox (every rank does it once per epoch; the index is cached). Multi-node: point `data.index_cache_dir` at a
shared file system, or each node builds its own index.

Rejects go to `data.rejects_path` (parquet: id, source, reason, detail, epoch, sample_index, rank):
`epoch-EEEE/plan.parquet` (written and counted by rank 0, when starting at position 0) and
`epoch-EEEE/rank-RRRRR-unit-UUUUUU.parquet` (per read unit, written when the unit completes; idempotent).

The deterministic order is (seed, epoch) only: the bucket choice, the packing and the rank split do not depend
on which worker finished first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from otterhd_ray.config import DataConfig
from otterhd_ray.data.buckets import (
    TOO_LONG,
    BucketPolicy,
    assemble,
    collate_to_torch,
    epoch_uniforms,
    num_image_tokens,
    packing_efficiency,
    plan_packs,
)
from otterhd_ray.data.mix import EpochPlan, plan_epoch, read_layout, repeat_id
from otterhd_ray.data.rejects import REJECT_SCHEMA, reject_row, rejects_table
from otterhd_ray.data.shards import list_shard_files, resolve_filesystem
from otterhd_ray.models.fuyu.inputs import IGNORE_INDEX, PATCH_DIM

INDEX_VERSION = 1
PREPROCESS_ERROR = "preprocess_error"
LENGTH_MISMATCH = "length_mismatch"
_READ_COLUMNS = ["id", "image", "conversations", "source"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


# ------------------------------------------------------------------------------------------------ stats
@dataclass
class PipelineStats:
    """What an iterator (or several, merged) produced. Tokens count real (non-filler) tokens only."""

    max_tokens: int
    num_micro_batches: int = 0
    num_fillers: int = 0
    num_samples: int = 0
    num_tokens: int = 0
    num_image_tokens: int = 0
    num_target_tokens: int = 0
    rejects: Counter = field(default_factory=Counter)
    buckets: Counter = field(default_factory=Counter)  # "HxW" -> samples
    sources: Counter = field(default_factory=Counter)
    wait_seconds: float = 0.0

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / (non-filler micro-batches x max_tokens)."""
        return packing_efficiency(self.num_tokens, self.num_micro_batches - self.num_fillers, self.max_tokens)

    @property
    def num_rejects(self) -> int:
        return sum(self.rejects.values())

    def merge(self, other: PipelineStats) -> PipelineStats:
        out = PipelineStats(max_tokens=self.max_tokens)
        for name in ("num_micro_batches", "num_fillers", "num_samples", "num_tokens", "num_image_tokens",
                     "num_target_tokens", "wait_seconds"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in ("rejects", "buckets", "sources"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_micro_batches": self.num_micro_batches,
            "num_fillers": self.num_fillers,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "num_image_tokens": self.num_image_tokens,
            "num_target_tokens": self.num_target_tokens,
            "packing_efficiency": round(self.packing_efficiency, 4),
            "rejects": dict(self.rejects),
            "buckets": dict(self.buckets),
            "sources": dict(self.sources),
        }


def format_stats(stats: PipelineStats, title: str = "input pipeline") -> str:
    """Bucket histogram, packing and reject statistics as a small text report."""
    real = stats.num_micro_batches - stats.num_fillers
    lines = [
        f"== {title} ==",
        f"samples {stats.num_samples}  micro-batches {stats.num_micro_batches} ({stats.num_fillers} filler)  "
        f"tokens {stats.num_tokens} (image {stats.num_image_tokens}, supervised {stats.num_target_tokens})",
        f"packing efficiency {stats.packing_efficiency:.2%} of {real} x {stats.max_tokens} token budget"
        + (f"  mean {stats.num_samples / real:.1f} samples/micro-batch" if real else ""),
        f"rejects {stats.num_rejects}" + (
            ": " + ", ".join(f"{r}={n}" for r, n in sorted(stats.rejects.items())) if stats.rejects else ""
        ),
        "sources: " + ", ".join(f"{s}={n}" for s, n in sorted(stats.sources.items())),
        f"buckets: {len(stats.buckets)} distinct sizes; samples by long side (px):",
    ]
    total = max(1, sum(stats.buckets.values()))
    long_sides: Counter = Counter()
    for bucket, n in stats.buckets.items():
        long_sides[max(int(x) for x in bucket.split("x"))] += n
    shown = sorted(side for side, _ in long_sides.most_common(10))
    rows = [(str(side), long_sides[side]) for side in shown]
    rest = total - sum(n for _, n in rows) if stats.buckets else 0
    if rest:
        rows.append(("other", rest))  # native sizes: one long side per image
    for label, n in rows:
        lines.append(f"  {label:>5}  {n:6d}  {'#' * max(1, round(40 * n / total))}")
    top = sorted(stats.buckets.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
    lines.append("most common sizes (HxW): " + ", ".join(f"{b}={n}" for b, n in top))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- processor
@lru_cache(maxsize=4)
def _processor(tokenizer_dir: str, template: str) -> Any:
    # One per worker process: loading a tokenizer costs far more than a sample.
    from otterhd_ray.data.processor import FuyuProcessor
    from otterhd_ray.data.tokenizer import load_tokenizer

    return FuyuProcessor(load_tokenizer(tokenizer_dir), template)


# -------------------------------------------------------------------------------------------- the index
@lru_cache(maxsize=8)
def _tokenizer_fingerprint(tokenizer_dir: str) -> str:
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


def index_file(path: str, tokenizer_dir: str, template: str, max_pixels: int) -> pa.Table:
    """Per-row (id, source, height, width, text_tokens, reason, detail) of one shard file, reading one row group
    at a time. Header-level checks only: pixels are decoded later, in preprocessing."""
    from otterhd_ray.data.images import BadSample, image_size

    processor = _processor(tokenizer_dir, template)
    out: dict[str, list] = {k: [] for k in ("id", "source", "height", "width", "text_tokens", "reason", "detail")}
    fs, inner, _ = resolve_filesystem(path)
    base = Path(inner).name
    with fs.open_input_file(inner) as handle:
        pf = pq.ParquetFile(handle)
        columns = [c for c in _READ_COLUMNS if c in pf.schema_arrow.names]
        file_row = 0
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=columns)
            rows = {c: table.column(c) for c in columns}
            for i in range(table.num_rows):
                rid = rows["id"][i].as_py() if "id" in rows else None
                source = rows["source"][i].as_py() if "source" in rows else None
                h = w = text = 0
                reason = detail = ""
                try:
                    if not isinstance(rid, str) or not rid:
                        raise BadSample("missing_id", "row has no id")
                    image = rows["image"][i].as_py() if "image" in rows else None
                    if image is None:
                        raise BadSample("missing_image", "image is null")
                    h, w = image_size(image, max_pixels)
                    conv = rows["conversations"][i].as_py() if "conversations" in rows else None
                    text = processor.num_text_tokens(conv)
                except BadSample as err:
                    reason, detail = err.reason, err.detail
                except Exception as err:  # a bug or an exotic row must not stop the index; it is a reject
                    reason, detail = PREPROCESS_ERROR, f"{type(err).__name__}: {err}"
                out["id"].append(rid if isinstance(rid, str) and rid else f"{base}:{file_row}")
                out["source"].append(source if isinstance(source, str) else "")
                out["height"].append(h)
                out["width"].append(w)
                out["text_tokens"].append(text)
                out["reason"].append(reason)
                out["detail"].append(detail[:500])
                file_row += 1
    return pa.table(
        {
            "id": pa.array(out["id"], pa.string()),
            "source": pa.array(out["source"], pa.string()),
            "height": pa.array(out["height"], pa.int32()),
            "width": pa.array(out["width"], pa.int32()),
            "text_tokens": pa.array(out["text_tokens"], pa.int32()),
            "reason": pa.array(out["reason"], pa.string()),
            "detail": pa.array(out["detail"], pa.string()),
        }
    )


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
    if len(missing) > 1 and _ray_ready():
        import ray

        remote = ray.remote(num_cpus=1)(index_file)
        built = ray.get([remote.remote(files[i], *args) for i in missing])
    else:
        built = [index_file(files[i], *args) for i in missing]
    for i, table in zip(missing, built, strict=True):
        _atomic_write_local(table, cache / f"{keys[i]}.parquet")
        tables[i] = table
    return tables, keys  # type: ignore[return-value]


def prepare_index(cfg: DataConfig, tokenizer_dir: str | Path) -> int:
    """Build the length index of every file of the mix (call once on the driver before training);
    returns the number of indexed rows."""
    files = [p for d in cfg.datasets for p in list_shard_files(d.path)]
    return sum(t.num_rows for t in load_index(cfg, str(tokenizer_dir), files)[0])


# ----------------------------------------------------------------------------------------- the schedule
@dataclass
class EpochSchedule:
    """Everything the ranks agree on for one epoch. Arrays are indexed by `sample_index`."""

    epoch: int
    world_size: int
    max_tokens: int
    plan: EpochPlan
    file_keys: list[str]  # per plan file: changes when the file does (row-group cache key)
    sample_id: list[str]
    sample_source: list[str]
    size_hw: np.ndarray  # int32 [N, 2], 0 for rejected samples
    length: np.ndarray  # int32 [N], predicted tokens, 0 for rejected samples
    plan_rejects: list[dict[str, Any]]
    micro_batches: list[np.ndarray]  # global list, each an int64 array of sample indices in epoch order
    per_rank: int  # micro-batches every rank yields (ceil(len(micro_batches) / world_size))

    def rank_micro_batches(self, rank: int) -> list[np.ndarray]:
        start = rank * self.per_rank
        return self.micro_batches[start : start + self.per_rank]


@dataclass
class _Sizing:
    """Per-sample results of looking the plan up in the index (arrays indexed by sample_index)."""

    ids: list[str]
    sources: list[str]
    size_hw: np.ndarray  # int32 [N, 2]
    length: np.ndarray  # int32 [N]
    keep: list[int]  # accepted sample indices, in epoch order
    rejects: list[dict[str, Any]]


def _size_samples(cfg: DataConfig, plan: EpochPlan, index: list[pa.Table], epoch: int) -> _Sizing:
    """Ids, bucket sizes and exact token counts of every sample; index-level rejects."""
    cols = [
        {k: t.column(k).to_numpy(zero_copy_only=False) for k in ("height", "width", "text_tokens", "reason")}
        | {"id": t.column("id").to_pylist(), "detail": t.column("detail")}
        for t in index
    ]
    policy = BucketPolicy(cfg.buckets)
    n = len(plan)
    uniforms = epoch_uniforms(cfg.seed, epoch, n)
    out = _Sizing([], [], np.zeros((n, 2), np.int32), np.zeros(n, np.int32), [], [])
    for i in range(n):
        f, fr = int(plan.file[i]), int(plan.file_row[i])
        c = cols[f]
        out.ids.append(repeat_id(c["id"][fr], int(plan.repeat[i])))
        out.sources.append(plan.datasets[plan.dataset[i]])  # the mix entry's name: the unit num_samples acts on
        if c["reason"][fr]:
            out.rejects.append(
                _reject(out.ids[i], out.sources[i], c["reason"][fr], c["detail"][fr].as_py(), epoch, i, 0)
            )
            continue
        hw = policy.size_for((int(c["height"][fr]), int(c["width"][fr])), float(uniforms[i]))
        out.size_hw[i] = hw
        out.length[i] = num_image_tokens(hw) + int(c["text_tokens"][fr])
        out.keep.append(i)
    return out


def schedule_epoch(
    cfg: DataConfig, tokenizer_dir: str | Path, epoch: int, world_size: int, plan: EpochPlan | None = None
) -> EpochSchedule:
    """The plan, bucket sizes, lengths, too-long rejects and the packed micro-batch list of `epoch`."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if plan is None:
        layouts = [[read_layout(p, i) for p in list_shard_files(d.path)] for i, d in enumerate(cfg.datasets)]
        plan = plan_epoch(cfg.datasets, cfg.seed, epoch, cfg.shuffle_window, layouts)
    index, file_keys = load_index(cfg, str(tokenizer_dir), [f.path for f in plan.files])
    sz = _size_samples(cfg, plan, index, epoch)
    policy = BucketPolicy(cfg.buckets)
    bins, too_long = plan_packs(
        [int(sz.length[i]) for i in sz.keep],
        [policy.group_key(tuple(sz.size_hw[i])) for i in sz.keep],
        cfg.max_tokens,
        cfg.max_samples_per_batch,
        cfg.packing_buffer_size,
    )
    for pos in too_long:
        i = sz.keep[pos]
        h, w = sz.size_hw[i]
        detail = f"{int(sz.length[i])} tokens at {h}x{w} > max_tokens={cfg.max_tokens}"
        sz.rejects.append(_reject(sz.ids[i], sz.sources[i], TOO_LONG, detail, epoch, i, 0))
        sz.length[i] = 0
    keep = np.asarray(sz.keep, np.int64)
    micro_batches = [keep[np.asarray(b, np.int64)] for b in bins]
    return EpochSchedule(
        epoch=int(epoch),
        world_size=world_size,
        max_tokens=cfg.max_tokens,
        plan=plan,
        file_keys=file_keys,
        sample_id=sz.ids,
        sample_source=sz.sources,
        size_hw=sz.size_hw,
        length=sz.length,
        plan_rejects=sorted(sz.rejects, key=lambda r: r["sample_index"]),
        micro_batches=micro_batches,
        per_rank=math.ceil(len(micro_batches) / world_size),
    )


def epoch_num_micro_batches(cfg: DataConfig, tokenizer_dir: str | Path, world_size: int, epoch: int) -> int:
    """Micro-batches every rank yields in `epoch` (fillers included)."""
    return schedule_epoch(cfg, tokenizer_dir, epoch, world_size).per_rank


def _reject(rid: str, source: str, reason: str, detail: str, epoch: int, index: int, rank: int) -> dict[str, Any]:
    return reject_row(rid, source, reason, detail, epoch=epoch, sample_index=index, rank=rank)


# --------------------------------------------------------------------------------------- preprocessing
def read_units(schedule: EpochSchedule, rank: int, unit_samples: int) -> list[dict[str, Any]]:
    """Group a rank's micro-batches into read units of >= `unit_samples` samples. Boundaries depend only on
    the schedule (never on the resume position), so a unit's rejects file is always complete."""
    units: list[dict[str, Any]] = []
    current: list[int] = []
    count = 0
    for j, mb in enumerate(schedule.rank_micro_batches(rank)):
        current.append(j)
        count += len(mb)
        if count >= unit_samples:
            units.append({"unit": len(units), "mbs": current})
            current, count = [], 0
    if current:
        units.append({"unit": len(units), "mbs": current})
    return units


def unit_payload(schedule: EpochSchedule, rank: int, unit: dict[str, Any], cfg: DataConfig,
                 tokenizer_dir: str) -> dict[str, Any]:
    """Everything a worker needs to preprocess one unit, as plain JSON-able values."""
    mbs = schedule.rank_micro_batches(rank)
    plan = schedule.plan
    samples = []
    for j in unit["mbs"]:
        for i in mbs[j].tolist():
            samples.append({
                "mb": j, "sample_index": i, "id": schedule.sample_id[i], "source": schedule.sample_source[i],
                "file": plan.files[plan.file[i]].path, "file_key": schedule.file_keys[plan.file[i]],
                "row_group": int(plan.row_group[i]), "row": int(plan.row[i]),
                "size": [int(x) for x in schedule.size_hw[i]], "length": int(schedule.length[i]),
            })
    return {
        "unit": unit["unit"], "samples": samples, "tokenizer_dir": str(tokenizer_dir),
        "template": cfg.instruction_template, "max_pixels": cfg.max_image_pixels, "max_tokens": cfg.max_tokens,
        "draft": cfg.draft_decode,
    }


def preprocess_unit(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Read, decode, resize, patchify and tokenize one unit; one output row per sample, in unit order.

    A failing sample yields a row with `reason` set (and empty arrays) instead of raising."""
    from otterhd_ray.data.images import BadSample, decode_image

    processor = _processor(payload["tokenizer_dir"], payload["template"])
    out = []
    for s in payload["samples"]:
        row = {"unit": payload["unit"], "mb": s["mb"], "sample_index": s["sample_index"], "id": s["id"],
               "source": s["source"], "reason": "", "detail": "", "input_ids": b"", "labels": b"",
               "patches": b"", "bucket_h": 0, "bucket_w": 0, "num_tokens": 0}
        try:
            table = _read_row_group(s["file"], s["file_key"], s["row_group"])
            data = table.column("image")[s["row"]].as_py()
            conv = table.column("conversations")[s["row"]].as_py()
            size = tuple(s["size"])
            image = decode_image(data, payload["max_pixels"], draft_target=size if payload["draft"] else None)
            sample = processor.encode_conversation(image, conv, size=size)
            n = int(sample["num_tokens"])
            if n > s["length"]:  # the plan under-counted: the micro-batch could overflow; never truncate
                raise BadSample(LENGTH_MISMATCH, f"planned {s['length']} tokens, processor made {n}")
            row.update(
                input_ids=sample["input_ids"].astype(np.int32).tobytes(),
                labels=sample["labels"].astype(np.int32).tobytes(),
                patches=np.ascontiguousarray(sample["patches"], dtype=np.uint8).tobytes(),
                bucket_h=int(sample["bucket"][0]), bucket_w=int(sample["bucket"][1]), num_tokens=n,
            )
        except BadSample as err:
            row.update(reason=err.reason, detail=err.detail[:500])
        except Exception as err:  # never let one row kill a long job; it is counted as a reject instead
            row.update(reason=PREPROCESS_ERROR, detail=f"{type(err).__name__}: {err}"[:500])
        out.append(row)
    return out


# Row groups read by this process, most recent last. The plan's window shuffle spreads a read unit over several
# row groups and each row group over several units; this cache makes each row group cost about one read per
# worker process and window instead of one per unit (bounded in bytes; it only ever holds shard columns).
ROW_GROUP_CACHE_BYTES = 256 << 20
_row_group_cache: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
row_group_reads = Counter()  # (file key, row group) -> reads from storage in this process (tests, diagnostics)


def _read_row_group(path: str, file_key: str, row_group: int) -> pa.Table:
    key = (file_key, row_group)
    table = _row_group_cache.get(key)
    if table is not None:
        _row_group_cache.move_to_end(key)
        return table
    fs, inner, _ = resolve_filesystem(path)
    with fs.open_input_file(inner) as handle:
        table = pq.ParquetFile(handle).read_row_group(row_group, columns=["image", "conversations"])
    row_group_reads[key] += 1
    _row_group_cache[key] = table
    total = sum(t.nbytes for t in _row_group_cache.values())
    while total > ROW_GROUP_CACHE_BYTES and len(_row_group_cache) > 1:
        _, old = _row_group_cache.popitem(last=False)
        total -= old.nbytes
    return table


def _ray_preprocess_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data `map_batches` UDF: a batch of JSON-encoded unit payloads -> their sample rows."""
    rows = [r for text in batch["payload"] for r in preprocess_unit(json.loads(text))]
    columns = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    return {k: np.array(v, dtype=object) if isinstance(v[0], (bytes, str)) else np.asarray(v)
            for k, v in columns.items()}


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _ray_has_spare_cpu() -> bool:
    """Auto mode uses Ray Data only when a preprocessing task could get a CPU: on a cluster whose CPUs the
    training workers hold, 1-CPU tasks would wait forever (ray#44687); preprocessing in-process is then the
    only way forward (and says so)."""
    if not _ray_ready():
        return False
    import ray

    if ray.available_resources().get("CPU", 0.0) >= 1.0:
        return True
    print("otterhd pipeline: Ray has no free CPU for preprocessing tasks; preprocessing in the training process")
    return False


def _iter_rows_ray(payloads: list[dict[str, Any]], cfg: DataConfig) -> Iterator[dict[str, Any]]:
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


def _iter_rows_local(payloads: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for payload in payloads:
        yield from preprocess_unit(payload)


# ----------------------------------------------------------------------------------------- the iterator
def filler_micro_batch(tokenizer_dir: str | Path) -> dict[str, Any]:
    """A 3-token micro-batch (one image patch, |NEWLINE|, <s>) with no supervised token: it runs the same
    forward/backward (every parameter touched, so DDP/ZeRO collectives match) and adds nothing to the loss."""
    from otterhd_ray.data.tokenizer import fuyu_tokens, load_tokenizer

    tok = fuyu_tokens(load_tokenizer(tokenizer_dir))
    return {
        "input_ids": np.array([tok.image, tok.newline, tok.bos], np.int64),
        "target_ids": np.full(3, IGNORE_INDEX, np.int64),
        "position_ids": np.arange(3, dtype=np.int64),
        "cu_seqlens": np.array([0, 3], np.int32),
        "max_seqlen": 3,
        "patches": np.zeros((1, PATCH_DIM), np.uint8),
        "sample_index": np.zeros(0, np.int64),
        "num_target_tokens": 0,
    }


def _row_to_sample(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "sample_index": int(row["sample_index"]),
        "input_ids": np.frombuffer(row["input_ids"], np.int32),
        "labels": np.frombuffer(row["labels"], np.int32),
        "patches": np.frombuffer(row["patches"], np.uint8).reshape(-1, PATCH_DIM),
        "num_tokens": int(row["num_tokens"]),
    }


class TrainIterator:
    """One rank's micro-batches for one epoch (see module doc). Iterate once."""

    def __init__(self, cfg: DataConfig, tokenizer_dir: str | Path, rank: int, world_size: int, epoch: int,
                 start_position: int = 0, use_ray: bool | None = None,
                 schedule: EpochSchedule | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg = cfg
        self.tokenizer_dir = str(tokenizer_dir)
        self.rank, self.world_size, self.epoch = rank, world_size, int(epoch)
        self.schedule = schedule or schedule_epoch(cfg, tokenizer_dir, epoch, world_size)
        if schedule is not None and (schedule.epoch != epoch or schedule.world_size != world_size):
            raise ValueError("schedule was built for another epoch or world size")
        self.num_micro_batches = self.schedule.per_rank
        if not 0 <= start_position <= self.num_micro_batches:
            raise ValueError(f"start_position {start_position} outside [0, {self.num_micro_batches}]")
        self.start_position = start_position
        self.use_ray = _ray_has_spare_cpu() if use_ray is None else use_ray
        self.stats = PipelineStats(max_tokens=cfg.max_tokens)
        self._filler = collate_to_torch(filler_micro_batch(tokenizer_dir))
        self._started = False

    def __len__(self) -> int:
        return self.num_micro_batches - self.start_position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._started:
            raise RuntimeError("a TrainIterator is iterated once; build a new one for the next epoch")
        self._started = True
        return self._generate()

    def _generate(self) -> Iterator[dict[str, Any]]:
        sched, p = self.schedule, self.start_position
        if self.rank == 0 and p == 0:
            self._count_plan_rejects()
        mbs = sched.rank_micro_batches(self.rank)
        units = [u for u in read_units(sched, self.rank, self.cfg.preprocess_batch_size) if u["mbs"][-1] >= p]
        payloads = [unit_payload(sched, self.rank, u, self.cfg, self.tokenizer_dir) for u in units]
        rows = _iter_rows_ray(payloads, self.cfg) if self.use_ray and payloads else _iter_rows_local(payloads)
        # Rows are gathered per micro-batch and emitted strictly in order once complete, so the output does not
        # depend on the order rows arrive in (Ray Data preserves it here anyway, which bounds this buffer).
        waiting: dict[int, list[dict[str, Any]]] = {}
        next_j = units[0]["mbs"][0] if units else len(mbs)
        unit_rejects: dict[int, list[dict[str, Any]]] = {}
        remaining = {u["unit"]: sum(len(mbs[j]) for j in u["mbs"]) for u in units}
        t0 = time.perf_counter()
        for row in rows:
            j, unit = int(row["mb"]), int(row["unit"])
            waiting.setdefault(j, []).append(row)
            if row["reason"]:
                unit_rejects.setdefault(unit, []).append(self._row_reject(row))
            remaining[unit] -= 1
            if remaining[unit] == 0:  # the unit is complete: its rejects file is whole before we yield past it
                self._write_rejects(f"rank-{self.rank:05d}-unit-{unit:06d}.parquet", unit_rejects.pop(unit, []))
            while next_j < len(mbs) and len(waiting.get(next_j, ())) == len(mbs[next_j]):
                yield from self._emit(sorted(waiting.pop(next_j), key=lambda r: int(r["sample_index"])), p, t0)
                next_j += 1
                t0 = time.perf_counter()
        if next_j != len(mbs) or waiting:
            raise AssertionError(f"rank {self.rank}: preprocessing lost rows (stopped at micro-batch {next_j})")
        for j in range(len(mbs), self.num_micro_batches):  # this rank's block is short: fillers
            if j >= p:
                self.stats.num_micro_batches += 1
                self.stats.num_fillers += 1
                yield {**self._filler, "position": j, "is_filler": True, "epoch": self.epoch, "sample_id": []}

    def _emit(self, rows: list[dict[str, Any]], start: int, t0: float) -> Iterator[dict[str, Any]]:
        j = int(rows[0]["mb"])
        if j < start:  # re-decoded only to rewrite the unit's rejects file; consumed before the resume
            return
        st = self.stats
        st.wait_seconds += time.perf_counter() - t0
        good = [r for r in rows if not r["reason"]]
        for r in rows:
            if r["reason"]:
                st.rejects[str(r["reason"])] += 1
        st.num_micro_batches += 1
        if not good:
            st.num_fillers += 1
            yield {**self._filler, "position": j, "is_filler": True, "epoch": self.epoch, "sample_id": []}
            return
        samples = [_row_to_sample(r) for r in good]
        mb = assemble(samples)
        if len(mb["input_ids"]) > self.cfg.max_tokens:  # internal invariant: the plan predicted every length
            raise AssertionError(f"micro-batch {j} has {len(mb['input_ids'])} tokens > {self.cfg.max_tokens}")
        for r in good:
            st.buckets[f"{int(r['bucket_h'])}x{int(r['bucket_w'])}"] += 1
            st.sources[str(r["source"])] += 1
        st.num_samples += len(good)
        st.num_tokens += len(mb["input_ids"])
        st.num_image_tokens += len(mb["patches"])
        st.num_target_tokens += mb["num_target_tokens"]
        out = collate_to_torch(mb)
        out.update(position=j, is_filler=False, epoch=self.epoch, sample_id=[s["id"] for s in samples])
        yield out

    def _row_reject(self, row: dict[str, Any]) -> dict[str, Any]:
        return _reject(str(row["id"]), str(row["source"]), str(row["reason"]), str(row["detail"]), self.epoch,
                       int(row["sample_index"]), self.rank)

    def _count_plan_rejects(self) -> None:
        for r in self.schedule.plan_rejects:
            self.stats.rejects[r["reason"]] += 1
        self._write_rejects("plan.parquet", self.schedule.plan_rejects, always=True)

    def _write_rejects(self, name: str, rejects: list[dict[str, Any]], always: bool = False) -> None:
        if not self.cfg.rejects_path or not (rejects or always):
            return
        fs, inner, _ = resolve_filesystem(self.cfg.rejects_path)
        folder = f"{inner}/epoch-{self.epoch:04d}"
        fs.create_dir(folder, recursive=True)
        table = rejects_table(rejects)
        tmp = f"{folder}/.{name}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as stream:
            pq.write_table(table, stream)
        fs.move(tmp, f"{folder}/{name}")


def build_train_iterator(
    cfg: DataConfig,
    tokenizer_dir: str | Path,
    rank: int,
    world_size: int,
    epoch: int,
    start_position: int = 0,
    *,
    use_ray: bool | None = None,
    schedule: EpochSchedule | None = None,
) -> TrainIterator:
    """One rank's packed micro-batches of `epoch`, starting at micro-batch `start_position` (see module doc).

    `use_ray=None`: Ray Data when Ray is initialised in this process (inside a Ray Train worker it is), else
    in-process. `schedule`: reuse one `schedule_epoch` result across ranks (tests, stats)."""
    return TrainIterator(cfg, tokenizer_dir, rank, world_size, epoch, start_position, use_ray, schedule)


def read_rejects(rejects_path: str | Path, epoch: int | None = None) -> pa.Table:
    """All rejects written under `rejects_path` (optionally one epoch) as one table."""
    fs, inner, _ = resolve_filesystem(str(rejects_path))
    base = inner if epoch is None else f"{inner}/epoch-{epoch:04d}"
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    files = sorted(i.path for i in infos if i.is_file and i.base_name.endswith(".parquet")
                   and not i.base_name.startswith("."))
    tables = [pq.read_table(fs.open_input_file(f)) for f in files]
    return pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()


# ------------------------------------------------------------------------------------------------- demo
def run_pipeline_stats(cfg: Any, world_size: int = 1, epoch: int = 0) -> PipelineStats:
    """Run every rank's iterator of one epoch (sequentially, in this process or on Ray) and print the stats.

    `cfg` is a `FinetuneConfig` (or a `DataConfig`). Without a tokenizer path the tiny offline one is built."""
    data = cfg if isinstance(cfg, DataConfig) else cfg.data
    tokenizer_dir = data.tokenizer_path
    if tokenizer_dir is None:
        from otterhd_ray.data.tokenizer import build_tiny_tokenizer

        tokenizer_dir = os.path.join(tempfile.mkdtemp(prefix="otterhd-tok-"), "tokenizer")
        build_tiny_tokenizer(tokenizer_dir)
        print(f"data.tokenizer_path is unset: using the tiny offline tokenizer ({tokenizer_dir})")
    schedule = schedule_epoch(data, tokenizer_dir, epoch, world_size)
    total = PipelineStats(max_tokens=data.max_tokens)
    t0 = time.perf_counter()
    for rank in range(world_size):
        it = build_train_iterator(data, tokenizer_dir, rank, world_size, epoch, schedule=schedule)
        for _ in it:
            pass
        total = total.merge(it.stats)
    seconds = time.perf_counter() - t0
    print(format_stats(total, f"input pipeline, epoch {epoch}, {world_size} rank(s), "
                              f"{schedule.per_rank} micro-batches per rank"))
    print(f"wall time {seconds:.1f} s ({total.num_samples / max(seconds, 1e-9):.1f} samples/s)")
    if data.rejects_path:
        print(f"rejects written under {data.rejects_path}")
    return total
