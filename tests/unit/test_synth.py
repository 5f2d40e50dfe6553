"""Synthetic data: shard/bench layouts, known answers checked in the pixels, determinism, bad and odd rows."""

from __future__ import annotations

import io
import json
import math
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from otterhd_ray.data import synth
from otterhd_ray.data.shards import SHARD_SCHEMA, iter_shard_rows, list_shard_files
from tests.helpers import shared_fixture

pytestmark = pytest.mark.timeout(60)
INSTRUCTION = re.compile(
    r"^(?P<q>[^?]+\?) A\. (?P<a>[^,]+), B\. (?P<b>[^,]+), C\. (?P<c>[^,]+), D\. (?P<d>[^,]+)$"
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    stats = synth.synthesize(out, num_train=24, num_bench=12, seed=3, rows_per_file=10)
    return out, stats


def target_mask(scene: synth.Scene) -> np.ndarray:
    pixels = np.asarray(scene.image, dtype=np.int32)
    return np.abs(pixels - np.array(synth.COLOURS[scene.colour])).sum(axis=-1) < 40


# --------------------------------------------------------------------------------------------- layout
def test_train_shards_follow_the_schema(small):
    out, stats = small
    files = list_shard_files(out / "train")
    assert len(files) == 3 and stats["train_files"] == 3 and stats["num_rows"] == 24
    assert all(pq.read_schema(f).equals(SHARD_SCHEMA) for f in files)
    rows = list(iter_shard_rows(out / "train"))
    assert len({r["id"] for r in rows}) == 24 and {r["source"] for r in rows} == {"synth"}
    for row in rows:
        turns = row["conversations"]
        assert 2 <= len(turns) <= 6 and len(turns) % 2 == 0
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert all(t["text"].strip() for t in turns)
        with Image.open(io.BytesIO(row["image"])) as img:
            img.load()
            long_side, short_side = max(img.size), min(img.size)
            assert 400 <= long_side <= 2000 and short_side / long_side >= 9 / 16 - 0.01
    assert any(len(r["conversations"]) > 2 for r in rows), "some samples must be multi-turn"
    assert len({Image.open(io.BytesIO(r["image"])).size for r in rows}) > 20, "sizes must vary"


def test_bench_has_exactly_the_hf_layout(small):
    out, _ = small
    ours = pq.read_schema(out / synth.BENCH_FILE)
    theirs = pq.read_schema(shared_fixture("magnifierbench", "data", "test-00000-of-00001.parquet"))
    assert ours.equals(theirs, check_metadata=True)
    assert ours.metadata[b"huggingface"] == theirs.metadata[b"huggingface"]


def test_bench_items_are_four_option_questions(small):
    out, _ = small
    items = pq.read_table(out / synth.BENCH_FILE).to_pylist()
    assert len(items) == 12 and [i["id"] for i in items] == [f"mag-3-{k:04d}" for k in range(12)]
    letters = []
    for item in items:
        match = INSTRUCTION.match(item["instruction"])
        assert match, item["instruction"]
        options = [match[k] for k in "abcd"]
        assert len(set(options)) == 4
        assert item["answer"] in "ABCD" and len(item["answer"]) == 1
        letters.append(item["answer"])
        (image,) = item["images"]
        with Image.open(io.BytesIO(image["bytes"])) as img:
            img.load()
            assert image["path"] == f"{item['id']}.{'png' if img.format == 'PNG' else 'jpg'}"
            assert max(img.size) >= 900
    assert len(set(letters)) > 1, "the answer letter must not be constant"


def test_both_jpeg_and_png_are_produced(small):
    out, _ = small
    formats = {Image.open(io.BytesIO(r["image"])).format for r in iter_shard_rows(out / "train")}
    assert formats == {"JPEG", "PNG"}


# -------------------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("kind", synth.KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_scene_answers_are_true_in_the_pixels(kind, seed):
    scene = synth.draw_scene(random.Random(f"t-{kind}-{seed}"), kind, long_min=400, long_max=1200)
    assert scene.kind == kind
    mask = target_mask(scene)
    width, height = scene.image.size
    fraction = mask.mean()
    # The target (group) is small: about 1% of the frame (its drawn shape fills part of its box).
    assert 0.001 < fraction < 0.02, fraction
    # Nothing else in the frame has the target's colour, and no distractor shares the target's shape, so
    # "the small red object" and "the small triangle" each name the target alone.
    assert scene.colour not in scene.distractor_colours and scene.shape not in scene.distractor_shapes
    ys, xs = np.nonzero(mask)
    if kind == "count":
        assert 1 <= scene.count <= 5 and scene.position is None
    else:
        assert scene.count == 1
        top = ys.max() < height / 2
        left = xs.max() < width / 2
        bottom, right = ys.min() > height / 2, xs.min() > width / 2
        assert (top or bottom) and (left or right)
        expected = ("top" if top else "bottom") + " " + ("left" if left else "right")
        assert expected == scene.position


def test_count_scenes_hold_that_many_separate_objects():
    for seed in range(4):
        scene = synth.draw_scene(random.Random(f"count-{seed}"), "count", long_min=600, long_max=1000)
        mask = target_mask(scene)
        assert count_blobs(mask) == scene.count


def count_blobs(mask: np.ndarray) -> int:
    """4-connected components, ignoring specks (outline gaps) of under 10 pixels."""
    seen = np.zeros_like(mask, dtype=bool)
    blobs = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        stack, size = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        blobs += size >= 10
    return blobs


@pytest.mark.parametrize("kind", synth.KINDS)
def test_bench_options_hold_the_truth_once(kind):
    for seed in range(5):
        rng = random.Random(f"opt-{kind}-{seed}")
        scene = synth.draw_scene(rng, kind, long_min=400, long_max=600)
        question, options, truth = synth._options(rng, scene)
        assert question.endswith("?") and len(options) == 4 and len(set(options)) == 4
        assert options.count(truth) == 1
        expected = {
            "colour": scene.colour,
            "shape": scene.shape,
            "count": str(scene.count),
            "position": scene.position,
        }[kind]
        assert truth == expected
        domain = {
            "colour": set(synth.COLOURS),
            "shape": set(synth.SHAPES),
            "count": {str(k) for k in range(1, 8)},
            "position": set(synth.POSITIONS),
        }[kind]
        assert set(options) <= domain


def test_train_answers_state_the_scene_facts():
    rng = random.Random("facts")
    for kind in synth.KINDS:
        scene = synth.draw_scene(rng, kind, long_min=400, long_max=500)
        for _ in range(5):
            _, answer = synth._question(rng, scene, kind)
            fact = {
                "colour": scene.colour,
                "shape": scene.shape,
                "count": (str(scene.count), synth.NUMBER_WORDS[scene.count]),
                "position": scene.position,
            }[kind]
            facts = fact if isinstance(fact, tuple) else (fact,)
            assert any(f in answer.lower() for f in facts), (kind, answer, facts)


# -------------------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_other_seed_differs(tmp_path, small):
    out, _ = small
    again = synth.synthesize(tmp_path / "again", num_train=24, num_bench=12, seed=3, rows_per_file=10)
    assert again["num_rows"] == 24
    first = pq.read_table(list_shard_files(out / "train"))
    second = pq.read_table(list_shard_files(tmp_path / "again" / "train"))
    assert first.equals(second)
    assert pq.read_table(out / synth.BENCH_FILE).equals(pq.read_table(tmp_path / "again" / synth.BENCH_FILE))
    other = synth.synthesize(tmp_path / "other", num_train=4, num_bench=2, seed=4)
    assert other["seed"] == 4
    assert synth.train_row(4, 0)["image"] != synth.train_row(3, 0)["image"]
    assert synth.bench_row(4, 0) != synth.bench_row(3, 0)


def test_rerun_replaces_earlier_output(tmp_path):
    synth.synthesize(tmp_path, num_train=12, num_bench=2, rows_per_file=4)
    assert len(list_shard_files(tmp_path / "train")) == 3
    synth.synthesize(tmp_path, num_train=3, num_bench=0, rows_per_file=4)
    assert [r["id"] for r in iter_shard_rows(tmp_path / "train")] == [f"syn-0-{i:06d}" for i in range(3)]
    assert not (tmp_path / synth.BENCH_FILE).exists()


def test_negative_counts_are_a_user_error(tmp_path):
    with pytest.raises(ValueError):
        synth.synthesize(tmp_path, num_train=-1)


# --------------------------------------------------------------------------------------- bad / odd rows
def test_default_has_no_bad_rows(small):
    out, stats = small
    assert stats["num_bad"] == 0 and stats["num_odd"] == 0
    assert all(r["id"].startswith("syn-") for r in iter_shard_rows(out / "train", columns=["id"]))


def problem(row: dict) -> str | None:
    """An independent check of each row: what a careful reader would reject it for."""
    turns = row["conversations"]
    if not turns:
        return "missing conversations"
    if any(not t["text"].strip() for t in turns):
        return "empty text"
    if not row["image"]:
        return "empty image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(row["image"])) as img:
                img.load()
    except Image.DecompressionBombError:
        return "bomb"
    except Exception as err:  # noqa: BLE001 - any decode failure is a reject
        return f"undecodable: {err}"
    return None


def test_bad_rows_are_bad_and_odd_rows_are_valid(tmp_path):
    num_bad = len(synth.BAD_KINDS)
    stats = synth.synthesize(tmp_path, num_train=10, num_bench=0, num_bad=num_bad, rows_per_file=8)
    rows = list(iter_shard_rows(tmp_path / "train"))
    assert len(rows) == 10 + num_bad == stats["num_rows"]
    bad = [r for r in rows if r["id"].startswith("bad-")]
    odd = [r for r in rows if r["id"].startswith("odd-")]
    assert len(bad) == stats["num_bad"] == sum(must for _, must in synth.BAD_KINDS)
    assert len(odd) == stats["num_odd"] == num_bad - len(bad)
    assert {r["id"].split("-")[1] for r in bad + odd} == {kind for kind, _ in synth.BAD_KINDS}
    for row in bad:
        assert problem(row) is not None, row["id"]
    modes = {}
    for row in odd:
        assert problem(row) is None, row["id"]
        with Image.open(io.BytesIO(row["image"])) as img:
            modes[row["id"].split("-")[1]] = (img.mode, img.getexif().get(0x0112))
    assert modes["rgba_png"][0] == "RGBA" and modes["palette_png"][0] == "P"
    assert modes["png_16bit"][0].startswith("I;16") and modes["cmyk_jpeg"][0] == "CMYK"
    assert modes["exif_rotated_jpeg"] == ("RGB", 6)
    # Bad rows are spread through the shards, not piled into the last file.
    positions = [i for i, r in enumerate(rows) if not r["id"].startswith("syn-")]
    assert positions[0] < 3 and positions[-1] > len(rows) - 4


def test_bomb_header_claims_a_huge_image():
    with Image.open(io.BytesIO(synth._bomb_png(1000, 700))) as img:
        assert img.size == (1000, 700)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(synth._bomb_png()))
    assert math.prod((100_000, 100_000)) > 2 * Image.MAX_IMAGE_PIXELS


def test_write_mimicit_matches_the_otter_format(tmp_path):
    pd = pytest.importorskip("pandas")
    paths = synth.write_mimicit(tmp_path, num_samples=6, seed=2, name="T", rows_per_group=4)
    doc = json.loads(Path(paths["instructions"]).read_text())
    assert set(doc) == {"meta", "data"} and len(doc["data"]) == 6
    for entry in doc["data"].values():
        assert set(entry) == {"instruction", "answer", "image_ids", "rel_ins_ids"}
    assert doc["data"]["T_INS_2_00000"]["rel_ins_ids"] == ["T_INS_2_00001"]
    frame = pd.read_parquet(paths["images"])  # pandas restores the image-id index from the metadata
    assert list(frame.index) == [f"T_IMG_2_{i:05d}" for i in range(6)] and list(frame.columns) == ["base64"]
    assert pq.ParquetFile(paths["images"]).num_row_groups == 2
    assert json.loads(Path(paths["train_config"]).read_text()) == {
        k: v["rel_ins_ids"] for k, v in doc["data"].items()
    }
