"""Shard schema, ShardWriter (row groups, files, atomic finalisation, overwrite) and the streaming readers."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otterhd_ray.data import shards
from otterhd_ray.data.rejects import REJECT_FIELDS
from otterhd_ray.data.shards import (
    SHARD_SCHEMA,
    ShardWriter,
    count_rows,
    iter_shard_rows,
    list_shard_files,
    write_rejects,
)


def make_row(i: int, image_size: int = 16) -> dict:
    return {
        "id": f"s-{i:04d}",
        "image": bytes([i % 251]) * image_size,
        "image_id": f"img-{i:04d}",
        "conversations": [{"role": "user", "text": f"q{i}?"}, {"role": "assistant", "text": f"a{i}."}],
        "source": "unit",
    }


def test_schema_is_the_contract():
    assert SHARD_SCHEMA.names == ["id", "image", "image_id", "conversations", "source"]
    assert SHARD_SCHEMA.field("image").type == pa.binary()
    turn = pa.struct([pa.field("role", pa.string()), pa.field("text", pa.string())])
    assert SHARD_SCHEMA.field("conversations").type == pa.list_(turn)
    for name in ("id", "image_id", "source"):
        assert SHARD_SCHEMA.field(name).type == pa.string()


def test_writer_splits_row_groups_and_files_and_round_trips(tmp_path):
    rows = [make_row(i) for i in range(23)]
    with ShardWriter(tmp_path, rows_per_group=4, rows_per_file=10) as w:
        w.write_many(rows)
    files = list_shard_files(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in files] == [
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    assert w.files == files and w.num_rows == 23
    groups = [
        [pq.ParquetFile(f).metadata.row_group(g).num_rows for g in range(pq.ParquetFile(f).num_row_groups)]
        for f in files
    ]
    assert groups == [[4, 4, 2], [4, 4, 2], [3]]
    for f in files:
        assert pq.read_schema(f).equals(SHARD_SCHEMA)
    assert list(iter_shard_rows(tmp_path)) == rows
    assert count_rows(tmp_path) == 23
    assert count_rows(files[:2]) == 20


def test_writer_flushes_a_group_early_on_bytes(tmp_path):
    with ShardWriter(tmp_path, rows_per_group=64, max_group_bytes=2500) as w:
        w.write_many(make_row(i, image_size=1000) for i in range(7))
    meta = pq.ParquetFile(w.files[0]).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [3, 3, 1]


def test_writer_starts_a_new_file_on_bytes(tmp_path):
    # Ray Data reads one file as one block, so a file of big images must end early too.
    with ShardWriter(tmp_path, rows_per_group=64, max_group_bytes=2500, max_file_bytes=5000) as w:
        w.write_many(make_row(i, image_size=1000) for i in range(10))
    layout = []
    for f in w.files:
        meta = pq.ParquetFile(f).metadata
        layout.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    assert layout == [[3, 3], [3, 1]]
    assert [r["id"] for r in iter_shard_rows(tmp_path)] == [f"s-{i:04d}" for i in range(10)]


def test_unfinished_file_is_invisible_and_removed_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, rows_per_group=2, rows_per_file=4) as w:
            w.write_many(make_row(i) for i in range(6))  # one finished file, one half-written
            names = sorted(p.name for p in tmp_path.iterdir())
            assert names == [".shard-00001.parquet.tmp", "shard-00000.parquet"]
            assert list_shard_files(tmp_path) == [str(tmp_path / "shard-00000.parquet")]
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.parquet"]
    assert [r["id"] for r in iter_shard_rows(tmp_path)] == [f"s-{i:04d}" for i in range(4)]


def test_nothing_is_listed_before_the_first_file_completes(tmp_path):
    w = ShardWriter(tmp_path, rows_per_group=1, rows_per_file=100)
    w.write(make_row(0))
    with pytest.raises(ValueError, match="no parquet shard files"):
        list_shard_files(tmp_path)
    w.close()
    assert count_rows(tmp_path) == 1


def test_existing_shards_need_overwrite(tmp_path):
    with ShardWriter(tmp_path, rows_per_file=2) as w:
        w.write_many(make_row(i) for i in range(5))
    assert len(w.files) == 3
    with pytest.raises(ValueError, match="already holds 3"):
        ShardWriter(tmp_path)
    with ShardWriter(tmp_path, overwrite=True) as w:
        w.write(make_row(9))
    assert [r["id"] for r in iter_shard_rows(tmp_path)] == ["s-0009"]  # no stale files mixed in
    # Another prefix in the same directory is not touched.
    with ShardWriter(tmp_path, prefix="other") as w:
        w.write(make_row(1))
    assert count_rows(tmp_path) == 2


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"id": ""}, "non-empty string id"),
        ({"image": "not bytes"}, "image must be bytes"),
        ({"conversations": [{"role": "system", "text": "x"}]}, "role must be one of"),
        ({"conversations": [{"role": "user"}]}, "each turn"),
        ({"conversations": "user: hi"}, "conversations must be a list"),
        ({"extra": 1}, "unknown fields"),
        ({"source": 3}, "source must be a string"),
    ],
)
def test_writer_rejects_rows_arrow_cannot_hold(tmp_path, patch, message):
    with ShardWriter(tmp_path) as w, pytest.raises(ValueError, match=message):
        w.write({**make_row(0), **patch})


def test_semantically_bad_rows_are_legal_shard_rows(tmp_path):
    # Undecodable images / missing conversations are the pipeline's to reject (with a reason), not the writer's.
    with ShardWriter(tmp_path) as w:
        w.write({**make_row(0), "image": b""})
        w.write({**make_row(1), "conversations": None, "image": None})
    got = list(iter_shard_rows(tmp_path))
    assert got[0]["image"] == b"" and got[1]["conversations"] is None and got[1]["image"] is None


def test_list_shard_files_dir_glob_file_uri(tmp_path):
    for sub in ("a", "b"):
        with ShardWriter(tmp_path / sub, rows_per_file=1) as w:
            w.write_many(make_row(i) for i in range(2))
    write_rejects(tmp_path / "a", [{"id": "x", "source": "unit", "reason": "bad_base64"}])
    (tmp_path / "a" / "_SUCCESS.parquet").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("not a shard")
    a = [str(tmp_path / "a" / f"shard-0000{i}.parquet") for i in range(2)]
    b = [str(tmp_path / "b" / f"shard-0000{i}.parquet") for i in range(2)]
    assert list_shard_files(tmp_path / "a") == a  # rejects, markers and other files skipped
    assert list_shard_files(str(tmp_path / "*" / "shard-*.parquet")) == a + b
    assert list_shard_files(str(tmp_path / "b" / "shard-0000[1]*")) == b[1:]
    assert list_shard_files(a[1]) == a[1:]
    assert list_shard_files(f"file://{tmp_path}/b") == b
    assert count_rows([tmp_path / "a", str(tmp_path / "b" / "*.parquet")]) == 4
    with pytest.raises(ValueError, match="not found"):
        list_shard_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no parquet shard files"):
        list_shard_files(tmp_path / "empty")


def test_rejects_file_has_the_one_rejects_schema(tmp_path):
    path = write_rejects(tmp_path, [{"id": "x", "source": "s", "reason": "empty_answer"}])
    (row,) = pq.read_table(path).to_pylist()
    assert row["id"] == "x" and row["source"] == "s" and row["reason"] == "empty_answer" and row["epoch"] is None
    empty = write_rejects(tmp_path / "none", [])
    assert pq.read_table(empty).num_rows == 0 and pq.read_schema(empty).names == list(REJECT_FIELDS)


def test_count_rows_reads_footers_only(tmp_path, monkeypatch):
    with ShardWriter(tmp_path, rows_per_group=3) as w:
        w.write_many(make_row(i) for i in range(10))

    def refuse(*args, **kwargs):
        raise AssertionError("count_rows must not read data pages")

    for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, refuse)
    assert count_rows(tmp_path) == 10


def test_iter_shard_rows_streams_one_row_group_at_a_time(tmp_path, monkeypatch):
    with ShardWriter(tmp_path, rows_per_group=3, rows_per_file=7) as w:
        w.write_many(make_row(i) for i in range(10))
    calls = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        calls.append((i, columns))
        return real(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole-file read"))
    stream = iter_shard_rows(tmp_path, columns=["id", "source"])
    first = next(stream)
    assert first == {"id": "s-0000", "source": "unit"} and len(calls) == 1  # lazily, one group so far
    rest = list(stream)
    assert [r["id"] for r in [first, *rest]] == [f"s-{i:04d}" for i in range(10)]
    assert [c[0] for c in calls] == [0, 1, 2, 0]  # file 1: 3+3+1 rows, file 2: 3 rows
    assert all(c[1] == ["id", "source"] for c in calls)


def test_resolve_filesystem_local_and_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, inner, prefix = shards.resolve_filesystem("rel/dir")
    assert inner == str(tmp_path / "rel" / "dir") and prefix == ""
    fs, inner, prefix = shards.resolve_filesystem(f"file://{tmp_path}")
    assert inner == str(tmp_path) and prefix == ""


def test_object_store_path_publishes_by_copy(tmp_path, monkeypatch):
    """A non-local file system (stand-in: a sub-tree fs, not LocalFileSystem) goes through copy + delete."""
    import pyarrow.fs as pafs

    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())

    calls = []

    def fake_resolve(path):
        assert str(path).startswith("store://")
        calls.append(str(path))
        return fs, str(path).removeprefix("store://"), "store://"

    monkeypatch.setattr(shards, "resolve_filesystem", fake_resolve)
    with ShardWriter("store://bucket/out", rows_per_file=3) as w:
        w.write_many(make_row(i) for i in range(5))
    assert w.files == ["store://bucket/out/shard-00000.parquet", "store://bucket/out/shard-00001.parquet"]
    assert sorted(p.name for p in (tmp_path / "bucket" / "out").iterdir()) == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    assert list_shard_files("store://bucket/out") == w.files
    calls.clear()
    assert count_rows("store://bucket/out") == 5
    assert calls == ["store://bucket/out"]  # resolved once for the directory, not once per file
    assert [r["id"] for r in iter_shard_rows("store://bucket/out/shard-*.parquet")] == [
        f"s-{i:04d}" for i in range(5)
    ]
    write_rejects("store://bucket/out", [])
    assert (tmp_path / "bucket" / "out" / "rejects.parquet").exists()
