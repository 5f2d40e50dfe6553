"""The training pipeline's rejects: its own reasons, and the files it writes under `data.rejects_path`, all in
the one rejects schema of `otterhd_ray.data.rejects` (rows are made with `reject_row`)::

    epoch-EEEE/plan.parquet                        index- and packing-level rejects (rank 0, at position 0)
    epoch-EEEE/rank-RRRRR-unit-UUUUUU.parquet      preprocessing rejects of one read unit (rewritten whole)

A row's `sample_index` is its position in the epoch order; `rank` is 0 for plan rejects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from otterhd_ray.data.rejects import REJECT_SCHEMA, rejects_table
from otterhd_ray.data.shards import resolve_filesystem

PREPROCESS_ERROR = "preprocess_error"  # an unexpected exception on one row: counted, never fatal
LENGTH_MISMATCH = "length_mismatch"  # the processor made more tokens than the schedule planned
PLAN_REJECTS_FILE = "plan.parquet"


def unit_rejects_file(rank: int, unit: int) -> str:
    return f"rank-{rank:05d}-unit-{unit:06d}.parquet"


def write_rejects(rejects_path: str, epoch: int, name: str, rows: list[Mapping[str, Any]]) -> None:
    """Write `rows` as `epoch-EEEE/name` under `rejects_path` (local or remote), atomically: a reader never
    sees half a file, and rewriting a file (a resumed read unit) replaces it whole."""
    fs, inner, _ = resolve_filesystem(rejects_path)
    folder = f"{inner}/epoch-{epoch:04d}"
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{name}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as stream:
        pq.write_table(rejects_table(list(rows)), stream)
    fs.move(tmp, f"{folder}/{name}")


def read_rejects(rejects_path: str | Path, epoch: int | None = None) -> pa.Table:
    """All rejects written under `rejects_path` (optionally one epoch) as one table."""
    from pyarrow import fs as pafs

    fs, inner, _ = resolve_filesystem(str(rejects_path))
    base = inner if epoch is None else f"{inner}/epoch-{epoch:04d}"
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    files = sorted(i.path for i in infos if i.is_file and i.base_name.endswith(".parquet")
                   and not i.base_name.startswith("."))
    tables = [pq.read_table(fs.open_input_file(f)) for f in files]
    return pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()
