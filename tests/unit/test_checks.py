"""Bad files never crash a job and are always named (issue 12, item 4): corrupt and wrong-schema shards, a dataset
with zero usable rows, `data stats`, `evaluate`, `finetune` refusing to start with one line."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from otterhd_ray.config import DataConfig, load_finetune_config
from otterhd_ray.data.checks import check_data, file_problem
from otterhd_ray.data.shards import SHARD_SCHEMA, list_shard_files
from otterhd_ray.data.synth import synthesize
from otterhd_ray.data.tokenizer import build_tiny_tokenizer

pytestmark = pytest.mark.timeout(180)
CORRUPT = b"PAR1 not a parquet file at all " * 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checks")
    synthesize(root, num_train=6, num_bench=0, seed=1, rows_per_file=3)
    build_tiny_tokenizer(root / "tokenizer")
    return root


def cfg_for(root: Path, path: Path, **kw) -> DataConfig:
    return DataConfig.model_validate({
        "datasets": [{"name": "mine", "path": str(path)}], "tokenizer_path": str(root / "tokenizer"),
        "index_cache_dir": str(root / "index"), "max_tokens": 2048, "buckets": {"long_sides": [240], "native": False},
        **kw,
    })


def with_bad_file(data: Path, tmp_path: Path, name: str, content: bytes | pa.Table) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    for f in (data / "train").glob("*.parquet"):
        (folder / f.name).write_bytes(f.read_bytes())
    if isinstance(content, bytes):
        (folder / name).write_bytes(content)
    else:
        pq.write_table(content, folder / name)
    return folder


def test_corrupt_shard_is_named_in_one_line(data, tmp_path):
    folder = with_bad_file(data, tmp_path, "shard-00001b.parquet", CORRUPT)
    with pytest.raises(ValueError) as err:
        check_data(cfg_for(data, folder), None)
    message = str(err.value)
    assert "\n" not in message and str(folder / "shard-00001b.parquet") in message
    assert "not a readable parquet file" in message and "data.on_bad_file=skip" in message


def test_skip_leaves_the_bad_file_out_and_counts_it(data, tmp_path):
    folder = with_bad_file(data, tmp_path, "shard-00001b.parquet", CORRUPT)
    cfg, report = check_data(cfg_for(data, folder, on_bad_file="skip"), str(data / "tokenizer"))
    bad = str(folder / "shard-00001b.parquet")
    assert report.skipped_files == [bad] and cfg.datasets[0].exclude == [bad]
    assert bad not in list_shard_files(cfg.datasets[0].path, cfg.datasets[0].exclude)
    assert report.accepted["mine"] == 6  # every good row is still trained on

    from otterhd_ray.data.pipeline import build_train_iterator

    ids = [i for mb in build_train_iterator(cfg, data / "tokenizer", 0, 1, 0, use_ray=False) for i in mb.sample_id]
    assert len(ids) == 6


def test_wrong_schema_file_names_the_missing_columns(data, tmp_path):
    folder = with_bad_file(data, tmp_path, "other.parquet", pa.table({"foo": [1], "bar": ["x"]}))
    with pytest.raises(ValueError, match=r"missing columns \['id', 'image', 'conversations'\] in .*other.parquet"):
        check_data(cfg_for(data, folder), None)
    assert file_problem(str(next((data / "train").glob("*.parquet")))) is None


def test_zero_usable_rows_names_the_dataset_and_reasons(data, tmp_path):
    rows = [{"id": f"r{i}", "image": b"", "image_id": None, "source": "x",
             "conversations": [{"role": "user", "text": "Q?"}, {"role": "assistant", "text": "A."}]} for i in range(3)]
    rows.append({**rows[0], "id": "r9", "image": b"not an image"})
    (tmp_path / "empty").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, SHARD_SCHEMA), tmp_path / "empty" / "shard-00000.parquet")
    with pytest.raises(ValueError) as err:
        check_data(cfg_for(data, tmp_path / "empty"), str(data / "tokenizer"))
    assert str(err.value) == (f"dataset 'mine' ({tmp_path / 'empty'}) has no usable rows: "
                              "empty_image=3, undecodable_image=1")


def test_text_only_rows_pass_the_checks(data, tmp_path):
    rows = [{"id": "t0", "image": None, "image_id": None, "source": "x",
             "conversations": [{"role": "user", "text": "Q?"}, {"role": "assistant", "text": "A."}]}]
    (tmp_path / "text").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, SHARD_SCHEMA), tmp_path / "text" / "shard-00000.parquet")
    _, report = check_data(cfg_for(data, tmp_path / "text"), str(data / "tokenizer"))
    assert report.accepted["mine"] == 1


def finetune_overrides(data: Path, shards: Path, out: Path) -> list[str]:
    return [f"data.datasets=[{{name: mine, path: {shards}}}]", f"data.tokenizer_path={data / 'tokenizer'}",
            f"data.index_cache_dir={data / 'index'}", f"train.output_dir={out}", f"ray.storage_path={out / 'ray'}",
            "ray.num_workers=2", "deepspeed.enabled=false"]


def test_finetune_refuses_to_start_with_one_line(data, tmp_path, capsys, monkeypatch):
    from otterhd_ray.finetune import main as finetune_main
    from otterhd_ray.train import trainer

    monkeypatch.setattr(trainer, "connect", lambda *a, **k: pytest.fail("Ray must not start"))
    folder = with_bad_file(data, tmp_path, "shard-00001b.parquet", CORRUPT)
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text("{}\n")
    rc = finetune_main(["--config", str(cfg_file), *finetune_overrides(data, folder, tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "shard-00001b.parquet" in err[0], err


def test_data_stats_names_the_corrupt_file(data, tmp_path, capsys):
    from otterhd_ray.cli import main as cli_main

    folder = with_bad_file(data, tmp_path, "shard-00001b.parquet", CORRUPT)
    cfg_file = tmp_path / "ft.yaml"
    cfg_file.write_text("{}\n")
    rc = cli_main(["data", "stats", "--config", str(cfg_file), *finetune_overrides(data, folder, tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(folder / "shard-00001b.parquet") in err[0], err


def test_evaluate_names_the_corrupt_file(tmp_path):
    from otterhd_ray.eval.benchmarks.base import rows_from_parquet

    bad = tmp_path / "test-00000-of-00001.parquet"
    bad.write_bytes(CORRUPT)
    with pytest.raises(ValueError, match=f"{bad}: not a readable parquet file"):
        list(rows_from_parquet([bad]))


def test_config_key():
    cfg = load_finetune_config(None, ["data.on_bad_file=skip"])
    assert cfg.data.on_bad_file == "skip"
    with pytest.raises(ValueError, match="on_bad_file"):
        load_finetune_config(None, ["data.on_bad_file=ignore"])
