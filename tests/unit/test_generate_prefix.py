"""Shared-prefix decoding: prompts that start with the same image are prefilled and cached once per group.

The grouped path (`share_prefix=True`) must give token-for-token the same output as the reference path
(`share_prefix=False`, itself checked against transformers in tests/parity/test_model_parity.py) on the debug
model in float32, for groups of 1, 2 and 3, different prefix lengths in one batch, a prompt without an image,
a one-token prompt, partly different images, and stop ids that end some rows early.
"""

from __future__ import annotations

import pytest
import torch

from otterhd_ray.models.fuyu import flavour_config, new_model
from otterhd_ray.models.fuyu.generate import _group_layout, prefix_groups
from tests import helpers

CFG = flavour_config("debug")
IMG, NL, BOS = CFG.image_token_id, CFG.image_token_id + 1, CFG.bos_token_id


def image(rows: int, cols: int, seed: int) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    patches = torch.randint(0, 256, (rows * cols, CFG.patch_dim), dtype=torch.uint8, generator=g)
    return ([IMG] * cols + [NL]) * rows, patches


def text(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, IMG, (n,), generator=g).tolist()


def questions(rows: int, cols: int, num: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return helpers.questions(CFG, rows, cols, num, seed)


def mixed_batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Groups of 1, 2, 3 and 2 with prefixes of different lengths; the third group has no image."""
    return questions(3, 4, 1, 0) + questions(2, 5, 2, 1) + questions(0, 0, 3, 2) + questions(4, 4, 2, 3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return new_model(CFG, attention="eager").eval()


# ------------------------------------------------------------------------------------------------ grouping
def test_groups_follow_shared_images_and_text():
    groups = prefix_groups(mixed_batch(), IMG, min_shared_tokens=1)
    assert [m for m, _ in groups] == [[0], [1, 2], [3, 4, 5], [6, 7]]
    image_and_text = [len(image(r, c, 0)[0]) + 1 + 3 for r, c in ((3, 4), (2, 5), (0, 0), (4, 4))]
    # a group of one keeps its last token; the others share image + <s> + the 3 common text tokens
    assert [p for _, p in groups] == [image_and_text[0] + 1, *image_and_text[1:]]
    # groups sharing fewer tokens than the threshold (16 and 4 here) split up
    assert [m for m, _ in prefix_groups(mixed_batch(), IMG, min_shared_tokens=20)] == [
        [0], [1], [2], [3], [4], [5], [6, 7]
    ]


def test_equal_patches_in_different_tensors_are_shared_and_a_differing_patch_cuts_the_prefix():
    (ids, patches), _ = questions(2, 3, 2, 5)
    same = patches.clone()
    assert prefix_groups([(ids, patches), (ids, same)], IMG, min_shared_tokens=1)[0] == ([0, 1], len(ids) - 1)
    other = patches.clone()
    other[4, 7] += 1  # patch 4 (row 1, column 1) is token 5: after 4 patches and a |NEWLINE|
    assert prefix_groups([(ids, patches), (ids, other)], IMG, min_shared_tokens=1) == [([0, 1], 5)]
    other[0, 0] += 1  # the first patch differs: nothing shared
    assert prefix_groups([(ids, patches), (ids, other)], IMG, min_shared_tokens=1) == [([0], 13), ([1], 13)]
    # raw pixels vs normalised floats are never taken as the same image
    floats = patches.float()
    assert len(prefix_groups([(ids, patches), (ids, floats)], IMG, min_shared_tokens=1)) == 2


def test_a_short_common_prefix_does_not_break_up_a_long_one():
    long_a, long_b = questions(4, 4, 2, 7)
    short = (torch.cat([long_a[0][:10], torch.tensor(text(40, 9))]), long_a[1][:8])
    # joining would shrink the pair's shared 24 tokens to 10: 2 x 14 tokens more of their own, 10 + 14 saved
    groups = prefix_groups([long_a, long_b, short], IMG, min_shared_tokens=1)
    assert [m for m, _ in groups] == [[0, 1], [2]]


def test_patch_count_mismatch_and_bad_threshold_are_errors():
    (ids, patches), _ = questions(2, 3, 2, 5)
    with pytest.raises(ValueError, match="prompt 0 has 6 image tokens but 5 patches"):
        prefix_groups([(ids, patches[:5])], IMG)
    with pytest.raises(ValueError, match="min_shared_tokens"):
        prefix_groups([(ids, patches)], IMG, min_shared_tokens=0)


def test_prefix_cache_is_stored_once_per_group():
    """Predictor-like batch (2 questions per image): the grouped cache is about half the per-prompt one."""
    prompts = [p for s in range(8) for p in questions(30, 40, 2, s)]
    groups = prefix_groups(prompts, IMG)
    lay = _group_layout(prompts, groups, 32, IMG)
    assert lay.num_members == 2 and len(groups) == 8
    grouped = len(groups) * lay.num_slots
    per_prompt = len(prompts) * (max(len(ids) for ids, _ in prompts) + 32)
    assert grouped < 0.55 * per_prompt


# ------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("chunk", [32_768, 20])  # 20: several prefill chunks per phase
def test_grouped_equals_reference(model, backend, chunk):
    model.set_switches(attention=backend)
    try:
        prompts = mixed_batch()
        ref = model.generate(prompts, max_new_tokens=8, stop_ids=[], share_prefix=False)
        got = model.generate(prompts, 8, [], share_prefix=True, min_shared_tokens=1, prefill_chunk_tokens=chunk)
    finally:
        model.set_switches(attention="eager")
    assert got == ref and all(len(r) == 8 for r in got)


def test_stop_ids_end_some_rows_early(model):
    prompts = mixed_batch()
    full = model.generate(prompts, 8, stop_ids=[], share_prefix=False)
    stop = full[2][3]  # row 2 (second member of a pair) stops at its 4th token
    ref = model.generate(prompts, 8, stop_ids=[stop], share_prefix=False)
    got = model.generate(prompts, 8, stop_ids=[stop], min_shared_tokens=1)
    assert got == ref
    assert got[2] == full[2][: full[2].index(stop) + 1] and len(got[2]) <= 4
    assert any(len(r) == 8 for r in got)  # the others run on
    # every row stopping at once ends the loop; max_new_tokens=1 needs no decoding step
    assert model.generate(prompts, 1, [], min_shared_tokens=1) == [r[:1] for r in full]


def test_one_token_prompt_partly_shared_image_and_identical_prompts(model):
    """A 1-token prompt (empty prefix) beside groups of unequal size (padding rows); two prompts whose images
    differ from patch 4 on (the suffix carries image tokens); two identical prompts."""
    (ids, patches), second = questions(2, 3, 2, 11)
    other = patches.clone()
    other[4:] = 255 - other[4:]
    prompts = [
        (torch.tensor([BOS]), None),
        (ids, patches),
        (ids, other),
        second,
        second,
        *questions(3, 3, 3, 12),
    ]
    groups = prefix_groups(prompts, IMG, min_shared_tokens=1)
    assert [m for m, _ in groups] == [[0], [1, 2, 3, 4], [5, 6, 7]] and groups[0][1] == 0 and groups[1][1] == 5
    ref = model.generate(prompts, 6, [], share_prefix=False)
    assert model.generate(prompts, 6, [], min_shared_tokens=1) == ref
    assert ref[3] == ref[4]


def test_groups_of_one_only_and_no_sharing(model):
    prompts = [questions(2, 2, 1, s)[0] for s in range(3)]
    assert [m for m, _ in prefix_groups(prompts, IMG)] == [[0], [1], [2]]
    assert model.generate(prompts, 5, []) == model.generate(prompts, 5, [], share_prefix=False)
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        model.generate(prompts, 5, [], prefill_chunk_tokens=0)
