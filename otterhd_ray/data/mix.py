"""The data mix and the epoch plan: which sample is read when, computed from parquet footers only.

A mix is `DataConfig.datasets` (like the seed's `Demo_Data.yaml`): several shard datasets, each with `num_samples`

- ``-1``: every row once;
- ``n < rows``: a fixed subsample of n rows, drawn with the mix seed only (the same rows every epoch; the order
  still changes per epoch);
- ``n > rows``: ``n // rows`` full passes plus a fixed subsample of ``n % rows`` rows; pass ``k`` (from 0) of a
  row is its repeat ``k`` and gets the id suffix ``#r<k>`` (``k >= 1``) so every sample id stays unique.

`plan_epoch(datasets, seed, epoch)` lists the row counts of every row group from the footers (no image bytes, no
column data) and returns an `EpochPlan`: one entry per sample in epoch order; the position in that order is the
sample's `sample_index`.

Order and I/O, the trade-off: a full random permutation of rows makes every read a random access into a row group
(each one read many times or held in memory). Instead the plan shuffles *row-group chunks* (one chunk = the selected
rows of one row group for one repeat) with `rng(seed, epoch)`, concatenates them, then shuffles rows inside
consecutive windows of `shuffle_window` rows. A window touches about `shuffle_window / rows_per_group + 1` row
groups, so a reader that handles a window at a time reads each row group about once, while samples are still
mixed across datasets (chunk shuffle) and across neighbouring row groups (window shuffle). Bigger windows mix
better and cost reader memory; two samples of one row group stay within one window of each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from otterhd_ray.config import DatasetSpec
from otterhd_ray.data.shards import list_shard_files, resolve_filesystem

DEFAULT_SHUFFLE_WINDOW = 1024
_SUBSAMPLE_SALT = 0x5A3B  # keeps the subsample stream independent from the per-epoch order stream


def repeat_id(row_id: str, repeat: int) -> str:
    """Sample id of a row's `repeat`-th pass; pass 0 keeps the row id."""
    return row_id if repeat == 0 else f"{row_id}#r{repeat}"


@dataclass(frozen=True)
class FileLayout:
    """Row-group layout of one shard file (from its footer)."""

    path: str
    dataset: int
    row_group_rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)

    def row_group_offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.row_group_rows)]).astype(np.int64)


@dataclass(frozen=True)
class EpochPlan:
    """Samples of one epoch in order. Arrays are aligned; position = `sample_index`.

    `file` indexes `files`; `row_group` / `row` locate the row inside the file (row within its row group);
    `file_row` is the row's position in the whole file (row-group offset + row); `repeat` is the pass number.
    """

    epoch: int
    seed: int
    datasets: tuple[str, ...]
    files: tuple[FileLayout, ...]
    dataset: np.ndarray  # int32 [N]
    file: np.ndarray  # int32 [N]
    row_group: np.ndarray  # int32 [N]
    row: np.ndarray  # int32 [N]
    file_row: np.ndarray  # int64 [N]
    repeat: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return len(self.file)


def read_layout(path: str, dataset: int) -> FileLayout:
    fs, inner, _ = resolve_filesystem(path)
    with fs.open_input_file(inner) as handle:
        meta = pq.ParquetFile(handle).metadata
        rows = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return FileLayout(path=path, dataset=dataset, row_group_rows=rows)


def _select_rows(num_rows: int, num_samples: int, seed: int, dataset: int) -> list[np.ndarray]:
    """Per pass k, the sorted dataset-row indices that pass uses (fixed across epochs)."""
    if num_samples == -1:
        return [np.arange(num_rows)]
    if num_samples < -1:
        raise ValueError(f"num_samples must be -1 or >= 0, got {num_samples}")
    full, rest = divmod(num_samples, num_rows) if num_rows else (0, 0)
    passes = [np.arange(num_rows) for _ in range(full)]
    if rest:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, dataset, _SUBSAMPLE_SALT])
        passes.append(np.sort(rng.choice(num_rows, size=rest, replace=False)))
    return passes


# chunk = (file index, row group, repeat, rows within the row group)
_Chunk = tuple[int, int, int, np.ndarray]


def _dataset_chunks(spec: DatasetSpec, ds_index: int, ds_files: Sequence[FileLayout], file_base: int,
                    seed: int) -> list[_Chunk]:
    """The chunks of one dataset's selected rows; `file_base` is its first file's index in the plan."""
    starts = np.cumsum([0] + [f.num_rows for f in ds_files])
    total = int(starts[-1])
    if total == 0 and spec.num_samples != 0:
        raise ValueError(f"dataset {spec.name!r} ({spec.path}) has no rows")
    chunks: list[_Chunk] = []
    for repeat, rows in enumerate(_select_rows(total, spec.num_samples, seed, ds_index)):
        # `rows` is sorted: binary searches split it by file and row group in O(files + row groups).
        file_cuts = np.searchsorted(rows, starts)
        for f_local, f in enumerate(ds_files):
            in_file = rows[file_cuts[f_local] : file_cuts[f_local + 1]] - starts[f_local]
            offsets = f.row_group_offsets()
            rg_cuts = np.searchsorted(in_file, offsets)
            for rg in range(len(f.row_group_rows)):
                sel = in_file[rg_cuts[rg] : rg_cuts[rg + 1]] - offsets[rg]
                if len(sel):
                    chunks.append((file_base + f_local, rg, repeat, sel.astype(np.int32)))
    return chunks


def _shuffled_rows(chunks: list[_Chunk], rng: np.random.Generator, shuffle_window: int) -> dict[str, np.ndarray]:
    """file / row_group / row / repeat per sample: chunks in a random order, then rows shuffled per window."""
    order = rng.permutation(len(chunks))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("file", "row_group", "row", "repeat")}
    for ci in order:
        f, rg, repeat, rows = chunks[ci]
        parts["file"].append(np.full(len(rows), f, np.int32))
        parts["row_group"].append(np.full(len(rows), rg, np.int32))
        parts["row"].append(rows)
        parts["repeat"].append(np.full(len(rows), repeat, np.int32))
    cat = {k: (np.concatenate(v) if v else np.zeros(0, np.int32)) for k, v in parts.items()}
    n = len(cat["file"])
    perm = np.arange(n)
    for start in range(0, n, shuffle_window):
        stop = min(n, start + shuffle_window)
        perm[start:stop] = start + rng.permutation(stop - start)
    return {k: v[perm] for k, v in cat.items()}


def plan_epoch(
    datasets: Sequence[DatasetSpec],
    seed: int,
    epoch: int,
    shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
    layouts: Sequence[Sequence[FileLayout]] | None = None,
) -> EpochPlan:
    """The deterministic sample order of `epoch` (see module doc). `layouts` skips re-reading footers."""
    if not datasets:
        raise ValueError("data.datasets is empty: the mix needs at least one dataset")
    if shuffle_window < 1:
        raise ValueError(f"shuffle_window must be >= 1, got {shuffle_window}")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names in the mix must be unique, got {names}")
    if layouts is None:
        layouts = [[read_layout(p, i) for p in list_shard_files(d.path, d.exclude)] for i, d in enumerate(datasets)]
    files: list[FileLayout] = [f for group in layouts for f in group]
    file_base = np.cumsum([0] + [len(group) for group in layouts])
    chunks = [c for i, (spec, group) in enumerate(zip(datasets, layouts, strict=True))
              for c in _dataset_chunks(spec, i, group, int(file_base[i]), seed)]
    cols = _shuffled_rows(chunks, np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)]), shuffle_window)
    # Vectorised (file, row group) -> first row of the group in its file, through one flat offsets table.
    flat_offsets = np.concatenate([f.row_group_offsets() for f in files]) if files else np.zeros(1, np.int64)
    group_base = np.cumsum([0] + [len(f.row_group_rows) + 1 for f in files])[:-1].astype(np.int64)
    file_row = flat_offsets[group_base[cols["file"]] + cols["row_group"]] + cols["row"]
    file_dataset = np.array([f.dataset for f in files], np.int32)
    return EpochPlan(
        epoch=int(epoch),
        seed=int(seed),
        datasets=tuple(names),
        files=tuple(files),
        dataset=file_dataset[cols["file"]],
        file=cols["file"],
        row_group=cols["row_group"],
        row=cols["row"],
        file_row=file_row,
        repeat=cols["repeat"],
    )
