"""The data mix and the footer-only epoch plan (otterhd_ray.data.mix)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otterhd_ray.config import DatasetSpec, FinetuneConfig, load_config
from otterhd_ray.data.mix import plan_epoch, read_layout, repeat_id


def _write(path, n: int, rows_per_group: int, prefix: str) -> None:
    # Only the layout matters to the plan; a tiny id column is enough.
    table = pa.table({"id": [f"{prefix}{i}" for i in range(n)]})
    pq.write_table(table, path, row_group_size=rows_per_group)


@pytest.fixture()
def two_datasets(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write(tmp_path / "a" / "shard-00000.parquet", 40, 8, "a")
    _write(tmp_path / "a" / "shard-00001.parquet", 13, 8, "a")
    _write(tmp_path / "b" / "shard-00000.parquet", 20, 5, "b")
    return tmp_path


def _source_counts(plan) -> dict[str, int]:
    return dict(Counter(plan.datasets[d] for d in plan.dataset.tolist()))


def _keys(plan):
    return list(zip(plan.file.tolist(), plan.file_row.tolist(), plan.repeat.tolist(), strict=True))


def test_all_rows_once_and_locations_are_consistent(two_datasets):
    specs = [DatasetSpec(name="a", path=str(two_datasets / "a")), DatasetSpec(name="b", path=str(two_datasets / "b"))]
    plan = plan_epoch(specs, seed=0, epoch=0, shuffle_window=16)
    assert len(plan) == 73 and _source_counts(plan) == {"a": 53, "b": 20}
    assert len(set(_keys(plan))) == 73 and set(plan.repeat.tolist()) == {0}
    # file_row = row-group offset + row: check against the id stored in the file
    for i in range(len(plan)):
        f = plan.files[plan.file[i]]
        table = pq.ParquetFile(f.path).read_row_group(int(plan.row_group[i]))
        assert table.column("id")[int(plan.row[i])].as_py() == pq.read_table(f.path).column("id")[
            int(plan.file_row[i])
        ].as_py()


def test_order_is_deterministic_and_reshuffled_per_epoch(two_datasets):
    specs = [DatasetSpec(name="a", path=str(two_datasets / "a")), DatasetSpec(name="b", path=str(two_datasets / "b"))]
    e0, e0b, e1 = (plan_epoch(specs, 3, e, 16) for e in (0, 0, 1))
    assert _keys(e0) == _keys(e0b)
    assert _keys(e0) != _keys(e1) and sorted(_keys(e0)) == sorted(_keys(e1))
    assert _keys(e0) != _keys(plan_epoch(specs, 4, 0, 16))


def test_subsample_is_fixed_across_epochs_and_repeats_get_distinct_ids(two_datasets):
    specs = [DatasetSpec(name="a", path=str(two_datasets / "a"), num_samples=10),
             DatasetSpec(name="b", path=str(two_datasets / "b"), num_samples=45)]
    e0, e1 = plan_epoch(specs, 0, 0), plan_epoch(specs, 0, 1)
    assert _source_counts(e0) == {"a": 10, "b": 45}

    def rows_of(plan, ds):
        sel = plan.dataset == ds
        return Counter(zip(plan.file[sel].tolist(), plan.file_row[sel].tolist(), plan.repeat[sel].tolist(),
                           strict=True))

    assert rows_of(e0, 0) == rows_of(e1, 0)  # same subsample, only the order changes
    b = rows_of(e0, 1)
    assert max(b.values()) == 1  # (row, repeat) unique
    assert Counter(r for (_, _, r) in b) == {0: 20, 1: 20, 2: 5}
    assert repeat_id("x", 0) == "x" and repeat_id("x", 2) == "x#r2"


def test_reads_stay_local_row_group_chunks_within_a_window(tmp_path):
    _write(tmp_path / "s.parquet", 1000, 50, "s")
    plan = plan_epoch([DatasetSpec(name="s", path=str(tmp_path / "s.parquet"))], 0, 0, shuffle_window=100)
    # every row group's rows sit within one chunk (50 rows) plus the windows it straddles
    for rg in range(20):
        pos = np.flatnonzero(plan.row_group == rg)
        assert pos.max() - pos.min() < 50 + 2 * 100
    # and a window touches few row groups (about window / rows_per_group + 1)
    for start in range(0, 1000, 100):
        assert len(set(plan.row_group[start : start + 100].tolist())) <= 4


def test_bad_mixes_are_value_errors(two_datasets, tmp_path):
    a = DatasetSpec(name="a", path=str(two_datasets / "a"))
    with pytest.raises(ValueError, match="empty"):
        plan_epoch([], 0, 0)
    with pytest.raises(ValueError, match="unique"):
        plan_epoch([a, a], 0, 0)
    with pytest.raises(ValueError, match="num_samples"):
        plan_epoch([DatasetSpec(name="a", path=str(two_datasets / "a"), num_samples=-5)], 0, 0)
    with pytest.raises(ValueError, match="not found|no parquet"):
        plan_epoch([DatasetSpec(name="x", path=str(tmp_path / "missing"))], 0, 0)


def test_layout_comes_from_the_footer(two_datasets):
    layout = read_layout(str(two_datasets / "a" / "shard-00001.parquet"), 0)
    assert layout.row_group_rows == (8, 5) and layout.num_rows == 13


def test_demo_mix_config_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "data" / "demo_mix.yaml"
    cfg = load_config(FinetuneConfig, path).data
    assert len(cfg.datasets) == 3 and [d.num_samples for d in cfg.datasets] == [-1, 384, 4]
