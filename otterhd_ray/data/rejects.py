"""The one rejects table: every row the data layer refuses (conversion, indexing, preprocessing, packing) is
written with this schema, so `read_rejects` and reports read any of them the same way.

Columns that do not apply to a stage are null: a conversion has no epoch or rank, a training reject has no
input file or record index (its `sample_index` is the position in the epoch order).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

REJECTS_FILE = "rejects.parquet"
DETAIL_MAX_CHARS = 500

REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("file", pa.string()),  # input file of a conversion (null in training)
        pa.field("record", pa.int64()),  # record index inside `file` (null in training)
        pa.field("epoch", pa.int32()),
        pa.field("sample_index", pa.int64()),
        pa.field("rank", pa.int32()),
    ]
)
REJECT_FIELDS = tuple(REJECT_SCHEMA.names)


def reject_row(
    rid: str | None,
    source: str | None,
    reason: str,
    detail: str = "",
    *,
    file: str | None = None,
    record: int | None = None,
    epoch: int | None = None,
    sample_index: int | None = None,
    rank: int | None = None,
) -> dict[str, Any]:
    """One rejects row; `detail` is cut to DETAIL_MAX_CHARS."""
    return {
        "id": rid,
        "source": source,
        "reason": reason,
        "detail": (detail or "")[:DETAIL_MAX_CHARS],
        "file": file,
        "record": None if record is None else int(record),
        "epoch": None if epoch is None else int(epoch),
        "sample_index": None if sample_index is None else int(sample_index),
        "rank": None if rank is None else int(rank),
    }


def rejects_table(rows: list[Mapping[str, Any]]) -> pa.Table:
    """Rows (any subset of the columns) -> a table with the full schema; missing columns are null."""
    return pa.Table.from_pylist([{k: r.get(k) for k in REJECT_FIELDS} for r in rows], REJECT_SCHEMA)
