"""Resolution buckets and token-budget packing (otterhd_ray.data.buckets)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from otterhd_ray.config import BucketConfig
from otterhd_ray.data.buckets import (
    BucketPolicy,
    StreamingPacker,
    assemble,
    collate_to_torch,
    epoch_uniforms,
    num_image_tokens,
    pack,
    packing_efficiency,
    plan_packs,
    sample_rng,
)
from otterhd_ray.models.fuyu import IGNORE_INDEX, PATCH_DIM


def _policy(**kw) -> BucketPolicy:
    return BucketPolicy(BucketConfig(**kw))


# ------------------------------------------------------------------------------------------------ buckets
def test_random_mode_keeps_aspect_rounds_to_30_and_never_enlarges():
    policy = _policy(mode="random")
    for i, native in enumerate([(3000, 4000), (1080, 1920), (600, 200), (2000, 2000), (90, 4000)]):
        for k in range(20):
            h, w = policy.choose_size(native, sample_rng(0, k, i))
            assert h % 30 == 0 and w % 30 == 0 and h >= 30 and w >= 30
            assert h <= 1080 and w <= 1920
            assert max(h, w) <= max(native) + 15  # no enlargement beyond rounding
            # aspect ratio within the rounding of one side (15 px) relative to the shorter side
            if min(native) >= 300:
                assert abs(h / w - native[0] / native[1]) < 0.1 * native[0] / native[1]


def test_random_mode_draws_every_allowed_long_side():
    policy = _policy(mode="random", long_sides=[448, 512, 768, 1024], native=True)
    seen = {max(policy.choose_size((1500, 1000), sample_rng(3, 0, i))) for i in range(200)}
    # 448->450, 512->510, 768->780, 1024->1020, native 1500 capped by the 1080 height -> 1080
    assert seen == {450, 510, 780, 1020, 1080}


def test_choice_is_a_pure_function_of_seed_epoch_index():
    policy = _policy(mode="random")
    a = [policy.choose_size((1200, 900), sample_rng(7, 2, i)) for i in range(50)]
    b = [policy.choose_size((1200, 900), sample_rng(7, 2, i)) for i in range(50)]
    c = [policy.choose_size((1200, 900), sample_rng(7, 3, i)) for i in range(50)]
    assert a == b and a != c


def test_epoch_uniforms_are_per_index_and_size_for_agrees_with_choose_size():
    u = epoch_uniforms(5, 1, 1000)
    assert np.array_equal(u[:10], epoch_uniforms(5, 1, 10))  # value i does not depend on the epoch's size
    assert not np.array_equal(u[:10], epoch_uniforms(5, 2, 10))
    policy = _policy(mode="random")
    rng = np.random.default_rng(3)
    expected = policy.size_for((1200, 900), float(np.random.default_rng(3).random()))
    assert policy.choose_size((1200, 900), rng) == expected


def test_small_image_gets_native_or_smallest_side():
    assert _policy(mode="random").choose_size((100, 200), sample_rng(0, 0, 0)) == (90, 210)
    assert _policy(mode="random", native=False).choose_size((100, 200), sample_rng(0, 0, 0)) == (210, 450)


def test_nearest_mode():
    policy = _policy(mode="nearest", native=False, long_sides=[448, 768, 1024])
    assert policy.choose_size((500, 250), sample_rng(0, 0, 0)) == (450, 210)  # 500 -> 448
    assert policy.choose_size((700, 350), sample_rng(0, 0, 0)) == (780, 390)  # 700 -> 768 (closer, enlarged)
    assert policy.choose_size((1900, 950), sample_rng(0, 0, 0)) == (1020, 510)  # 1900 -> 1024
    assert _policy(mode="nearest").choose_size((4000, 3000), sample_rng(0, 0, 0)) == (1080, 810)  # native cap


def test_seed_mode_is_one_random_square():
    policy = _policy(mode="seed")
    sizes = {policy.choose_size((1000, 300), sample_rng(0, 0, i)) for i in range(100)}
    assert sizes == {(448, 448), (512, 512), (768, 768)}
    assert policy.group_key((448, 448)) != policy.group_key((512, 512))
    assert _policy(mode="random").group_key((450, 300)) == _policy(mode="random").group_key((90, 210))


def test_bad_bucket_config_is_a_value_error():
    with pytest.raises(ValueError, match="no size"):
        _policy(mode="random", long_sides=[], native=False)
    with pytest.raises(ValueError):
        _policy(mode="random").choose_size((0, 10), sample_rng(0, 0, 0))


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
    assert mb["input_ids"].tolist() == list(range(100, 105)) + list(range(200, 204))
    # a: labels at 3,4 -> targets at 2,3; its last token (4) predicts nothing. b: labels 1,3 -> targets 0,2.
    assert mb["target_ids"].tolist() == [-100, -100, 103, 104, -100, 201, -100, 203, -100]
    assert mb["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert mb["cu_seqlens"].tolist() == [0, 5, 9] and mb["cu_seqlens"].dtype == np.int32
    assert mb["max_seqlen"] == 5 and mb["num_target_tokens"] == 4
    assert mb["patches"].shape == (3, PATCH_DIM) and mb["patches"][:, 0].tolist() == [1, 1, 2]
    assert mb["sample_index"].tolist() == [1, 2]
    t = collate_to_torch(mb)
    import torch

    assert t["input_ids"].dtype == torch.int64 and t["cu_seqlens"].dtype == torch.int32
    assert t["patches"].dtype == torch.uint8 and t["max_seqlen"] == 5


def test_pack_stream_groups_by_bucket_and_collects_too_long():
    samples = [_sample(40, 1, [39], i, bucket=(30 * (1 + i % 2), 30)) for i in range(20)]
    samples.append(_sample(500, 1, [0], 99))
    rejects: list[dict] = []
    mbs = list(pack(samples, max_tokens=200, buffer_size=4, rejects=rejects))
    assert rejects == [{"id": "s99", "source": "t", "reason": "too_long", "sample_index": 99}]
    seen = sorted(i for mb in mbs for i in mb["sample_index"].tolist())
    assert seen == list(range(20))
    for mb in mbs:
        assert len(mb["input_ids"]) <= 200
        assert len({int(i) % 2 for i in mb["sample_index"]}) == 1  # one bucket per micro-batch
    with pytest.raises(ValueError, match="too_long|max_tokens"):
        list(pack([_sample(500, 1, [0], 0)], max_tokens=200))


def test_small_buffer_never_emits_underfilled_micro_batches_mid_stream():
    rng = np.random.default_rng(2)
    lengths = rng.integers(50, 150, 2000).tolist()
    bins, _ = plan_packs(lengths, None, 2000, buffer_size=4)  # count cap far below one budget's worth
    sums = [sum(lengths[i] for i in b) for b in bins]
    assert all(s > 2000 - 150 for s in sums[:-1]), min(sums[:-1])
