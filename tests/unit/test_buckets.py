"""Resolution buckets and token-budget packing (otterhd_ray.data.buckets)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from otterhd_ray.config import BucketConfig, ConfigError, load_finetune_config
from otterhd_ray.data.buckets import (
    BucketPolicy,
    StreamingPacker,
    assemble,
    epoch_uniforms,
    num_image_tokens,
    packing_efficiency,
    plan_packs,
)
from otterhd_ray.data.pipeline import collate
from otterhd_ray.models.fuyu import IGNORE_INDEX, PATCH_DIM


def _policy(**kw) -> BucketPolicy:
    return BucketPolicy(BucketConfig(**kw))


# ------------------------------------------------------------------------------------------------ buckets
def test_random_mode_keeps_aspect_rounds_to_30_and_never_enlarges():
    policy = _policy(mode="random")
    natives = [(3000, 4000), (1080, 1920), (600, 200), (2000, 2000), (90, 4000)]
    for k in range(20):
        for native, u in zip(natives, epoch_uniforms(0, k, len(natives)), strict=True):
            h, w = policy.size_for(native, float(u))
            assert h % 30 == 0 and w % 30 == 0 and h >= 30 and w >= 30
            assert h <= 1080 and w <= 1920
            assert max(h, w) <= max(native) + 15  # no enlargement beyond rounding
            # aspect ratio within the rounding of one side (15 px) relative to the shorter side
            if min(native) >= 300:
                assert abs(h / w - native[0] / native[1]) < 0.1 * native[0] / native[1]


def test_random_mode_draws_every_allowed_long_side():
    policy = _policy(mode="random", long_sides=[448, 512, 768, 1024], native=True)
    seen = {max(policy.size_for((1500, 1000), float(u))) for u in epoch_uniforms(3, 0, 200)}
    # 448->450, 512->510, 768->780, 1024->1020, native 1500 capped by the 1080 height -> 1080
    assert seen == {450, 510, 780, 1020, 1080}
    # u in [0, 1) splits evenly over the candidates: the ends pick the first and the last
    assert max(policy.size_for((1500, 1000), 0.0)) == 450 and max(policy.size_for((1500, 1000), 0.999)) == 1080


def test_choice_is_a_pure_function_of_seed_epoch_index():
    policy = _policy(mode="random")
    a, b, c = ([policy.size_for((1200, 900), float(u)) for u in epoch_uniforms(7, e, 50)] for e in (2, 2, 3))
    assert a == b and a != c


def test_epoch_uniforms_are_per_index():
    u = epoch_uniforms(5, 1, 1000)
    assert np.array_equal(u[:10], epoch_uniforms(5, 1, 10))  # value i does not depend on the epoch's size
    assert not np.array_equal(u[:10], epoch_uniforms(5, 2, 10))
    assert not np.array_equal(u[:10], epoch_uniforms(6, 1, 10))
    assert ((u >= 0) & (u < 1)).all()


def test_small_image_gets_native_or_smallest_side():
    for u in (0.0, 0.5, 0.99):
        assert _policy(mode="random").size_for((100, 200), u) == (90, 210)
        assert _policy(mode="random", native=False).size_for((100, 200), u) == (210, 450)


def test_nearest_mode():
    policy = _policy(mode="nearest", native=False, long_sides=[448, 768, 1024])
    assert policy.size_for((500, 250), 0.5) == (450, 210)  # 500 -> 448
    assert policy.size_for((700, 350), 0.5) == (780, 390)  # 700 -> 768 (closer, enlarged)
    assert policy.size_for((1900, 950), 0.5) == (1020, 510)  # 1900 -> 1024
    assert _policy(mode="nearest").size_for((4000, 3000), 0.5) == (1080, 810)  # native cap
    assert policy.size_for((500, 250), 0.0) == policy.size_for((500, 250), 0.99)  # the draw is ignored


def test_otterhd_mode_is_one_random_square():
    policy = _policy(mode="otterhd")
    sizes = {policy.size_for((1000, 300), float(u)) for u in epoch_uniforms(0, 0, 100)}
    assert sizes == {(448, 448), (512, 512), (768, 768)}
    assert policy.group_key((448, 448)) != policy.group_key((512, 512))
    assert _policy(mode="random").group_key((450, 300)) == _policy(mode="random").group_key((90, 210))
    assert _policy(mode="otterhd", otterhd_sizes=[600]).size_for((10, 20), 0.7) == (600, 600)


def test_old_seed_spelling_loads_with_a_warning(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  buckets:\n    mode: seed\n    seed_sizes: [448, 512]\n  seed: 3\n")
    with caplog.at_level("WARNING", logger="otterhd_ray.config"):
        cfg = load_finetune_config(old)
    assert cfg.data.buckets.mode == "otterhd" and cfg.data.buckets.otterhd_sizes == [448, 512]
    assert cfg.data.seed == 3  # data.seed is the RNG seed and keeps its name
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2, notes
    assert "data.buckets.mode" in notes[0] and "'otterhd'" in notes[0]
    assert "data.buckets.seed_sizes" in notes[1] and "otterhd_sizes" in notes[1]
    caplog.clear()
    with caplog.at_level("WARNING", logger="otterhd_ray.config"):
        new = load_finetune_config(None, ["data.buckets.mode=otterhd", "data.buckets.otterhd_sizes=[448,512]"])
    assert new.data.buckets == cfg.data.buckets and not caplog.records
    assert load_finetune_config(None, ["data.buckets.mode=seed"]).data.buckets.mode == "otterhd"
    with pytest.raises(ConfigError, match="otterhd_sizes only"):
        load_finetune_config(None, ["data.buckets.seed_sizes=[448]", "data.buckets.otterhd_sizes=[512]"])
    with pytest.raises(ConfigError, match="data.buckets.mode"):
        load_finetune_config(None, ["data.buckets.mode=squares"])


def test_bad_bucket_config_is_a_value_error():
    with pytest.raises(ValueError, match="no size"):
        _policy(mode="random", long_sides=[], native=False)
    with pytest.raises(ValueError, match="otterhd_sizes"):
        _policy(mode="otterhd", otterhd_sizes=[])
    with pytest.raises(ValueError):
        _policy(mode="random").size_for((0, 10), 0.5)


def test_num_image_tokens_matches_the_processor(tiny_tokenizer_dir):
    from otterhd_ray.data.processor import FuyuProcessor
    from otterhd_ray.data.tokenizer import load_tokenizer

    proc = FuyuProcessor(load_tokenizer(tiny_tokenizer_dir))
    conv = [{"role": "user", "text": "What is it?"}, {"role": "assistant", "text": "red"}]
    image = Image.new("RGB", (640, 480))
    base = int(proc.encode_conversation(image, conv, size=(30, 30))["num_tokens"]) - num_image_tokens((30, 30))
    for size in [(448, 448), (450, 600), (1080, 1920), (31, 59)]:
        sample = proc.encode_conversation(image, conv, size=size)
        assert int(sample["num_tokens"]) == num_image_tokens(size) + base
        assert tuple(sample["bucket"]) == size


# ------------------------------------------------------------------------------------------------ packing
def _check_bins(bins, lengths, max_tokens, max_samples=0):
    flat = [i for b in bins for i in b]
    assert sorted(flat) == sorted(set(flat))
    for b in bins:
        assert sum(lengths[i] for i in b) <= max_tokens
        assert max_samples == 0 or len(b) <= max_samples
    return flat


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 3000), min_size=0, max_size=300),
    buffer=st.integers(1, 64),
    max_samples=st.sampled_from([0, 1, 3]),
)
def test_packer_keeps_every_sample_once_within_budget(lengths, buffer, max_samples):
    bins, rejected = plan_packs(lengths, None, 2048, max_samples, buffer)
    flat = _check_bins(bins, lengths, 2048, max_samples)
    assert sorted(flat + rejected) == list(range(len(lengths)))
    assert rejected == [i for i, n in enumerate(lengths) if n > 2048]


def test_packer_groups_never_mix_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 900, 500).tolist()
    keys = rng.integers(0, 3, 500).tolist()
    bins, _ = plan_packs(lengths, keys, 4096, buffer_size=32)
    for b in bins:
        assert len({keys[i] for i in b}) == 1
    assert bins == plan_packs(lengths, keys, 4096, buffer_size=32)[0]


def test_packing_efficiency_on_a_realistic_mix_reaches_95_percent():
    # Fuyu-like lengths: images of long side 448..1080 (150..1300 tokens) + 20..300 text tokens.
    rng = np.random.default_rng(1)
    lengths = (rng.integers(150, 1300, 3000) + rng.integers(20, 300, 3000)).tolist()
    bins, _ = plan_packs(lengths, None, 16384, buffer_size=256)
    eff = packing_efficiency(sum(lengths), len(bins), 16384)
    assert eff >= 0.95, eff


def test_too_long_is_rejected_not_truncated():
    packer = StreamingPacker(max_tokens=100, buffer_size=4)
    assert packer.add(None, 101, "long") == []
    assert packer.rejected == ["long"]
    with pytest.raises(ValueError):
        StreamingPacker(max_tokens=0)


# ------------------------------------------------------------------------------------------ micro-batches
def _sample(n: int, num_patches: int, sup: list[int], index: int, bucket=(30, 60)) -> dict:
    ids = np.arange(100 * index, 100 * index + n, dtype=np.int32)
    labels = np.full(n, IGNORE_INDEX, np.int32)
    labels[sup] = ids[sup]
    patches = np.full((num_patches, PATCH_DIM), index, np.uint8)
    return {"id": f"s{index}", "source": "t", "input_ids": ids, "labels": labels, "patches": patches,
            "bucket": np.array(bucket, np.int32), "num_tokens": np.int32(n), "sample_index": index}


def test_assemble_shifts_targets_per_sample_and_restarts_positions():
    a, b = _sample(5, 2, [3, 4], 1), _sample(4, 1, [1, 3], 2)
    mb = assemble([a, b])
    assert mb.input_ids.tolist() == list(range(100, 105)) + list(range(200, 204))
    # a: labels at 3,4 -> targets at 2,3; its last token (4) predicts nothing. b: labels 1,3 -> targets 0,2.
    assert mb.target_ids.tolist() == [-100, -100, 103, 104, -100, 201, -100, 203, -100]
    assert mb.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert mb.cu_seqlens.tolist() == [0, 5, 9]
    assert mb.max_seqlen == 5 and mb.num_target_tokens == 4
    assert mb.patches.shape == (3, PATCH_DIM) and mb.patches[:, 0].tolist() == [1, 1, 2]
    import torch

    assert mb.input_ids.dtype == mb.target_ids.dtype == mb.position_ids.dtype == torch.int64
    assert mb.cu_seqlens.dtype == torch.int32 and mb.patches.dtype == torch.uint8
    full = collate([a, b], epoch=3, position=7)
    assert full.sample_index.tolist() == [1, 2] and full.sample_id == ("s1", "s2") and not full.is_filler
    assert (full.epoch, full.position, full.num_samples) == (3, 7, 2)
    assert torch.equal(full.packed.input_ids, mb.input_ids)
    with pytest.raises(ValueError, match="sample ids"):
        dataclasses.replace(full, sample_id=("s1",))
    filler = dataclasses.replace(full, sample_index=torch.zeros(0, dtype=torch.int64), sample_id=())
    assert filler.is_filler and filler.num_samples == 0


def test_planned_packs_assemble_one_bucket_per_micro_batch_within_budget():
    # The pipeline's path: plan_packs on lengths with otterhd-mode keys (the bucket), then assemble each bin.
    samples = [_sample(40, 1, [39], i, bucket=(30 * (1 + i % 2), 30)) for i in range(20)]
    samples.append(_sample(500, 1, [0], 99))
    policy = _policy(mode="otterhd")
    keys = [policy.group_key(tuple(s["bucket"].tolist())) for s in samples]
    bins, too_long = plan_packs([int(s["num_tokens"]) for s in samples], keys, 200, buffer_size=4)
    assert too_long == [20]  # the 500-token sample: rejected, never truncated
    mbs = [collate([samples[i] for i in b], epoch=0, position=j) for j, b in enumerate(bins)]
    seen = sorted(i for mb in mbs for i in mb.sample_index.tolist())
    assert seen == list(range(20))
    for mb in mbs:
        assert mb.packed.num_tokens <= 200
        assert len({int(i) % 2 for i in mb.sample_index}) == 1  # one bucket per micro-batch
        assert mb.sample_index.tolist() == sorted(mb.sample_index.tolist())  # epoch order kept
    with pytest.raises(ValueError, match="no samples"):
        assemble([])


def test_small_buffer_never_emits_underfilled_micro_batches_mid_stream():
    rng = np.random.default_rng(2)
    lengths = rng.integers(50, 150, 2000).tolist()
    bins, _ = plan_packs(lengths, None, 2000, buffer_size=4)  # count cap far below one budget's worth
    sums = [sum(lengths[i] for i in b) for b in bins]
    assert all(s > 2000 - 150 for s in sums[:-1]), min(sums[:-1])
