"""MagnifierBench loading: fixture layout, counted skips, option parsing, the seed's prompt conventions."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from otterhd_ray.eval.benchmarks import format_for_model, get_benchmark
from otterhd_ray.eval.benchmarks.magnifierbench import mc_prompt, split_instruction
from otterhd_ray.eval.config import BenchDatasetSpec
from tests.helpers import shared_fixture


def load_magnifierbench(spec: BenchDatasetSpec):
    return get_benchmark("magnifierbench")(spec).load()


def _png(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def _write_bench(path: Path, rows: list[dict]) -> None:
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("instruction", pa.string()),
            ("answer", pa.string()),
            ("images", pa.list_(image_t)),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=2)


def _row(i: int, images: int = 1, instruction: str | None = None, answer: str = "B") -> dict:
    return {
        "id": f"it-{i}",
        "instruction": instruction or "What color is the dot? A. red, B. green, C. blue, D. yellow",
        "answer": answer,
        "images": [{"bytes": _png(), "path": f"{i}.png"} for _ in range(images)],
    }


def test_loads_the_hf_fixture_layout():
    res = load_magnifierbench(BenchDatasetSpec(data_path=str(shared_fixture("magnifierbench"))))
    assert res.num_rows == 6 and len(res.items) == 6 and not res.skipped
    item = res.items[0]
    doc = item.doc
    assert doc["ff_question"].endswith("?") and set(doc["options"]) == {"A", "B", "C", "D"}
    assert doc["ff_answer"] == doc["options"][doc["answer"]] and item.target == doc["answer"]
    assert item.prompts == {"mc": doc["mc_question"], "ff": doc["ff_question"]}
    assert Image.open(io.BytesIO(item.image)).size[0] > 0


def test_skips_are_counted_never_silent(tmp_path):
    rows = [
        _row(0),
        _row(1, images=2),
        _row(2, images=0),
        _row(3, instruction="Describe the image."),
        _row(4, answer="E"),
        _row(5),
        _row(0),  # a duplicate id
    ]
    _write_bench(tmp_path / "data" / "test-00000-of-00001.parquet", rows)
    res = load_magnifierbench(BenchDatasetSpec(data_path=str(tmp_path)))
    assert [it.id for it in res.items] == ["it-0", "it-5"]
    assert res.num_rows == 7
    assert dict(res.skipped) == {
        "multi_image": 1,
        "no_image": 1,
        "unparsable_options": 1,
        "answer_not_an_option": 1,
        "duplicate_id": 1,
    }
    assert res.skipped_ids["multi_image"] == ["it-1"]
    assert len(res.items) + sum(res.skipped.values()) == res.num_rows


def test_split_selection_and_max_items(tmp_path):
    _write_bench(tmp_path / "data" / "test-00000-of-00001.parquet", [_row(i) for i in range(5)])
    _write_bench(tmp_path / "data" / "validation-00000-of-00001.parquet", [_row(9)])
    assert [
        it.id
        for it in load_magnifierbench(BenchDatasetSpec(data_path=str(tmp_path), split="validation")).items
    ] == ["it-9"]
    assert len(load_magnifierbench(BenchDatasetSpec(data_path=str(tmp_path), max_items=3)).items) == 3
    single = tmp_path / "data" / "test-00000-of-00001.parquet"
    assert len(load_magnifierbench(BenchDatasetSpec(data_path=str(single))).items) == 5


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_magnifierbench(BenchDatasetSpec(data_path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no parquet files"):
        load_magnifierbench(BenchDatasetSpec(data_path=str(tmp_path / "empty")))


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="Otter-AI/MagnifierBench"):
        load_magnifierbench(
            BenchDatasetSpec(data_path="Otter-AI/MagnifierBench", cache_dir=str(tmp_path / "c"))
        )


def test_split_instruction_keeps_commas_and_dots_inside_options():
    q, opts = split_instruction("How long is the rod? A. 3.5 m, B. red, white, C. 10, D. none of them")
    assert q == "How long is the rod?"
    assert opts == {"A": "3.5 m", "B": "red, white", "C": "10", "D": "none of them"}
    q, opts = split_instruction("Which one? A. yes, B. no")
    assert opts == {"A": "yes", "B": "no"}
    for bad in ("Describe it.", "Which? B. x, C. y", "A. x, B. y"):
        with pytest.raises(ValueError):
            split_instruction(bad)


def test_prompt_conventions():
    instr = "What is it? A. cat, B. dog"
    prompt = "Answer with the option letter from the given choices directly."
    assert mc_prompt(instr, prompt) == f"{prompt} {instr}"
    assert mc_prompt(instr, "") == instr
    assert format_for_model("fuyu", "Q?") == "Q?"
    assert format_for_model("otterhd", "Q?") == "User: Q? Assistant:"
    with pytest.raises(ValueError):
        format_for_model("llava", "Q?")
