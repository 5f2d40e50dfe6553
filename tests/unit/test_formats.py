"""LLaVA / sharegpt / alpaca / HF parquet / the_cauldron importers: every fixture record lands where its id says
(`ok-...` accepted, `bad-<reason>-...` rejected with that reason, naming file and record), the Fuyu layout rules,
streaming, validate, auto-detection, the CLI and the Ray Data mode."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from otterhd_ray.cli import _FORMATS
from otterhd_ray.cli import main as cli_main
from otterhd_ray.data.formats import FORMATS, ConvertRequest, convert
from otterhd_ray.data.formats.common import (
    Parsed,
    RecordError,
    apply_layout,
    iter_json_records,
    strip_placeholders,
)
from otterhd_ray.data.formats.detect import detect_format
from otterhd_ray.data.shards import iter_shard_rows

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from make_format_fixtures import make_format_fixtures  # noqa: E402

from tests.helpers import shared_fixture  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("formats")
    make_format_fixtures(root)
    return root


def run(fx_out: Path, fmt: str, inputs: list, **kw):
    req = ConvertRequest(format=fmt, inputs=[str(p) for p in inputs], out_dir=str(fx_out), **kw)
    stats = convert(req, say=lambda _line: None)
    rows = {r["id"]: r for r in iter_shard_rows(fx_out)} if stats.files else {}
    return stats, rows, pq.read_table(fx_out / "rejects.parquet").to_pylist()


def assert_ids_say_it(rows: dict, rejects: list, expected_ok: set[str]) -> None:
    """`ok-*` ids accepted, `bad-<reason>-*` ids rejected with <reason>; every reject names file and record."""
    assert set(rows) == expected_ok
    for r in rejects:
        assert r["file"] and r["record"] is not None and r["record"] >= 0, r
        if r["id"] and r["id"].startswith("bad-"):
            assert r["id"].split("-")[1] == r["reason"], r


# ------------------------------------------------------------------------------------------- layout rules
@pytest.mark.parametrize("text, clean", [
    ("<image>\nWhat is it?", "What is it?"),
    ("What is it?\n<image>", "What is it?"),
    ("Look at <image> and say.", "Look at and say."),
    ("line one\n<image>\nline two", "line one\nline two"),
    ("<image>", ""),
])
def test_placeholders_are_removed_wherever_they_stood(text, clean):
    assert strip_placeholders(text) == (clean, text.count("<image>"))


def test_layout_rules():
    one = [object()]
    ok = Parsed("a", [("user", "<image>\nQ?"), ("assistant", "A.")], one)
    assert apply_layout(ok, False) == [{"role": "user", "text": "Q?"}, {"role": "assistant", "text": "A."}]
    no_placeholder = Parsed("b", [("user", "Q?"), ("assistant", "A.")], one)
    with pytest.raises(RecordError) as err:
        apply_layout(no_placeholder, False)
    assert err.value.reason == "image_count_mismatch"
    assert apply_layout(no_placeholder, True)[0]["text"] == "Q?"  # the_cauldron: images precede the text
    with pytest.raises(RecordError, match="multi_image"):
        apply_layout(Parsed("c", [("user", "Q?"), ("assistant", "A.")], one * 2), True)
    with pytest.raises(RecordError, match="image_count_mismatch"):  # mismatch is checked before multi_image
        apply_layout(Parsed("c", [("user", "<image>Q?"), ("assistant", "A.")], one * 2), False)
    system = Parsed("d", [("system", "Be brief."), ("user", "Q?"), ("assistant", "A.")], [])
    assert apply_layout(system, False)[0] == {"role": "user", "text": "Be brief.\n\nQ?"}


# ------------------------------------------------------------------------------------------------ formats
def test_llava_json_array(fx, tmp_path):
    stats, rows, rejects = run(tmp_path, "llava", [fx / "llava" / "llava.json"])
    assert_ids_say_it(rows, rejects, {"ok-start", "ok-end", "ok-mid", "ok-multiturn", "ok-text-only"})
    assert stats.num_samples == 5 and stats.num_rejected == 14 and stats.num_text_only == 1
    assert stats.reasons["image_count_mismatch"] == 3 and stats.reasons["multi_image"] == 1
    images = fx / "llava" / "images"
    assert rows["ok-start"]["image"] == (images / "red.jpg").read_bytes()  # bytes copied as they are
    assert rows["ok-start"]["image_id"] == "images/red.jpg"
    assert [t["text"] for t in rows["ok-mid"]["conversations"]] == ["Look at and name the colour.", "Green."]
    assert rows["ok-end"]["conversations"][0]["text"] == "What colour is it?"
    assert rows["ok-text-only"]["image"] is None and rows["ok-text-only"]["image_id"] is None
    assert len(rows["ok-multiturn"]["conversations"]) == 4
    assert {r["source"] for r in rows.values()} == {"llava"}
    by_reason = {r["reason"]: r for r in rejects}
    assert by_reason["malformed_record"]["record"] == 18 and by_reason["malformed_record"]["id"] is None
    assert by_reason["empty_image"]["detail"] == "no image bytes"  # 0 bytes: empty_image, nothing else
    assert by_reason["image_too_large"]["detail"].endswith("> limit 89478485")  # our limit, not PIL's
    assert all(r["file"] == str(fx / "llava" / "llava.json") for r in rejects)


def test_configured_pixel_limit_is_the_one_reported(fx, tmp_path):
    stats, rows, rejects = run(tmp_path, "llava", [fx / "llava" / "llava.json"], max_pixels=2000)
    too_large = [r for r in rejects if r["reason"] == "image_too_large"]
    assert {r["id"] for r in too_large} >= {"ok-start", "ok-mid", "bad-image_too_large"}
    assert all(r["detail"].endswith("> limit 2000") for r in too_large)


def test_llava_jsonl_bad_line_is_one_reject(fx, tmp_path):
    stats, rows, rejects = run(tmp_path, "llava", [fx / "llava" / "llava.jsonl"])
    assert set(rows) == {"ok-start", "ok-end", "ok-mid", "ok-multiturn", "ok-text-only"}
    assert [(r["reason"], r["record"]) for r in rejects] == [("bad_json", 5), ("image_count_mismatch", 6)]


@pytest.mark.parametrize("dataset, fmt, ok", [
    ("sg_openai", "sharegpt", {"ok-openai", "ok-openai-system", "ok-openai-text"}),
    ("sg_classic", "sharegpt", {"ok-classic"}),
    ("alpaca_demo", "alpaca", {"ok-alpaca", "ok-alpaca-history", "ok-alpaca-text"}),
])
def test_llamafactory_dataset_info(fx, tmp_path, dataset, fmt, ok):
    info = fx / "sharegpt" / "dataset_info.json"
    stats, rows, rejects = run(tmp_path, "auto", [], dataset_info=str(info), dataset=dataset)
    assert stats.format == fmt
    assert_ids_say_it(rows, rejects, ok)
    assert {r["source"] for r in rows.values()} == {dataset}
    if dataset == "sg_openai":
        assert rows["ok-openai-system"]["conversations"][0]["text"] == "Be brief.\n\nHi"
        assert rows["ok-openai"]["image"] == (fx / "sharegpt" / "images" / "red.jpg").read_bytes()
    if dataset == "alpaca_demo":
        turns = [t["text"] for t in rows["ok-alpaca-history"]["conversations"]]
        assert turns == ["What colour?", "Blue.", "And now?", "Still blue."]
        assert rows["ok-alpaca"]["conversations"][0]["text"] == "Describe the image."


def test_dataset_info_mistakes_are_one_line(fx):
    info = str(fx / "sharegpt" / "dataset_info.json")
    with pytest.raises(ValueError, match="cannot be converted offline"):
        convert(ConvertRequest("auto", [], None, dataset_info=info, dataset="from_hub"))
    with pytest.raises(ValueError, match="no dataset 'nope'"):
        convert(ConvertRequest("auto", [], None, dataset_info=info, dataset="nope"))
    with pytest.raises(ValueError, match="says 'alpaca_demo' is alpaca"):
        convert(ConvertRequest("sharegpt", [], None, dataset_info=info, dataset="alpaca_demo"))


def test_hf_parquet_image_columns(fx, tmp_path):
    stats, rows, rejects = run(tmp_path, "hf", [fx / "hf" / "vqa", fx / "hf" / "chat.parquet"])
    assert_ids_say_it(rows, rejects, {"ok-bytes", "ok-path-only", "ok-placeholder", "ok-no-image", "ok-chat"})
    assert rows["ok-path-only"]["image"] == (fx / "hf" / "images" / "blue.png").read_bytes()
    assert rows["ok-no-image"]["image"] is None
    assert rows["ok-bytes"]["source"] == "vqa"  # <config>/train-00000-of-00001.parquet: the config names it


def test_the_cauldron(fx, tmp_path):
    stats, rows, rejects = run(tmp_path, "cauldron", [fx / "cauldron"])
    stem = "train-00000-of-00001"
    assert set(rows) == {f"{stem}-{i:08d}" for i in (0, 1, 2)}
    assert [(r["record"], r["reason"]) for r in rejects] == [(3, "multi_image"), (4, "missing_text")]
    assert len(rows[f"{stem}-00000001"]["conversations"]) == 4 and rows[f"{stem}-00000002"]["image"] is None
    assert {r["source"] for r in rows.values()} == {"vqav2"}


def test_broken_files_are_named_and_counted_never_a_crash(fx, tmp_path):
    broken = fx / "broken"
    stats, rows, rejects = run(tmp_path, "hf", [broken / "corrupt.parquet", fx / "hf" / "chat.parquet",
                                                broken / "wrong_schema.parquet"])
    assert set(rows) == {"ok-chat"}  # the good file between two bad ones still converts
    assert len(stats.bad_files) == 2 and str(broken / "corrupt.parquet") in stats.bad_files[0]
    assert "Parquet magic bytes" in stats.bad_files[0] and "['foo', 'bar']" in stats.bad_files[1]
    assert [r["file"] for r in rejects if r["reason"] == "unreadable_file"] == [
        str(broken / "corrupt.parquet"), str(broken / "wrong_schema.parquet")]
    stats, rows, rejects = run(tmp_path / "t", "llava", [broken / "truncated.json"])
    assert stats.bad_files and "truncated.json: invalid JSON after" in stats.bad_files[0]
    assert "\n" not in stats.bad_files[0]


def test_real_format_shared_fixtures(tmp_path):
    shared = shared_fixture()
    stats, rows, rejects = run(tmp_path / "mb", "auto", [shared / "magnifierbench"])
    assert stats.format == "hf" and stats.num_samples == pq.read_metadata(
        next((shared / "magnifierbench").rglob("*.parquet"))).num_rows and not rejects
    stats, rows, _ = run(tmp_path / "mi", "auto", [shared / "mimicit" / "SYN_instructions.json"])
    assert stats.format == "mimicit" and stats.num_samples == 8


# ----------------------------------------------------------------------------------- streaming, detection
def test_json_arrays_are_streamed_not_loaded(fx, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a JSON array must not be json.load()ed whole")

    monkeypatch.setattr(json, "load", refuse)
    monkeypatch.setattr(json, "loads", refuse)
    records = list(iter_json_records(fx / "llava" / "llava.json"))
    assert len(records) == 19 and records[0][1]["id"] == "ok-start"


@pytest.mark.parametrize("path, fmt", [
    ("llava/llava.json", "llava"), ("llava/llava.jsonl", "llava"), ("sharegpt/sg_openai.json", "sharegpt"),
    ("sharegpt/sg_classic.jsonl", "sharegpt"), ("sharegpt/alpaca.json", "alpaca"),
    ("hf/chat.parquet", "hf"), ("cauldron/vqav2/train-00000-of-00001.parquet", "cauldron"),
])
def test_auto_detect(fx, path, fmt):
    assert detect_format(str(fx / path))[0] == fmt


def test_auto_detect_refuses_what_it_cannot_tell(fx):
    with pytest.raises(ValueError, match="wrong_schema.parquet: a parquet file of no known layout"):
        detect_format(str(fx / "broken" / "wrong_schema.parquet"))
    with pytest.raises(ValueError, match="corrupt.parquet: not a readable parquet"):
        detect_format(str(fx / "broken" / "corrupt.parquet"))


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_formats_match_the_registry():
    assert _FORMATS == FORMATS


def test_cli_convert_validate_and_exit_codes(fx, tmp_path, capsys):
    rc = cli_main(["data", "validate", str(fx / "llava" / "llava.json"), "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0 and "auto: " in out.err and "llava" in out.err
    assert "image_count_mismatch" in out.out and "llava.json:5 image_count_mismatch" in out.out
    assert not any(tmp_path.iterdir())  # validate writes nothing
    rc = cli_main(["data", "convert", "--format", "llava", str(fx / "llava" / "llava.json"),
                   "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0 and len(list(iter_shard_rows(tmp_path / "o"))) == 5
    rc = cli_main(["data", "convert", "--format", "hf", str(fx / "broken" / "corrupt.parquet"),
                   "--out", str(tmp_path / "b"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "could not be read" in err


def test_cli_mimicit_invocation_still_works(tmp_path, capsys):
    from otterhd_ray.data.synth import write_mimicit

    paths = write_mimicit(tmp_path / "m", num_samples=4, seed=1, name="SYN")
    rc = cli_main(["data", "convert", "--instructions", str(paths["instructions"]), "--images",
                   str(paths["images"]), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0 and len(list(iter_shard_rows(tmp_path / "o"))) == 4
    assert "format mimicit" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- Ray
@pytest.mark.timeout(400)
def test_ray_mode_gives_the_same_rows_and_rejects(fx, tmp_path):
    ray = pytest.importorskip("ray")
    inputs = [fx / "llava" / "llava.json", fx / "llava" / "llava.jsonl"]
    local, local_rows, local_rejects = run(tmp_path / "local", "llava", inputs)
    try:
        from otterhd_ray.data.formats.common import run_conversion
        from otterhd_ray.data.formats.llava import LlavaConverter
        from otterhd_ray.data.formats.parallel import run_conversion_ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        stats = run_conversion_ray(LlavaConverter(), [str(p) for p in inputs], tmp_path / "ray", chunk_records=4)
        assert stats.num_samples == local.num_samples and stats.reasons == local.reasons
        rows = {r["id"]: r for r in iter_shard_rows(tmp_path / "ray")}
        assert rows.keys() == local_rows.keys() and all(rows[k] == local_rows[k] for k in rows)
        key = ("file", "record", "reason")
        rejects = pq.read_table(tmp_path / "ray" / "rejects.parquet").to_pylist()
        assert sorted(tuple(r[k] for k in key) for r in rejects) == sorted(
            tuple(r[k] for k in key) for r in local_rejects)
        assert len(stats.files) > 2  # several chunks, each its own shard file
        # a broken array: the records before the break convert, the file is named
        broken = run_conversion_ray(LlavaConverter(), [str(fx / "broken" / "truncated.json")], None,
                                    chunk_records=1)
        assert broken.bad_files and "truncated.json" in broken.bad_files[0]
        assert run_conversion(LlavaConverter(), [str(fx / "broken" / "truncated.json")], None).reasons == \
            broken.reasons
    finally:
        ray.shutdown()
