"""Predictor actor logic without Ray: columns, both questions per item, bad images, resolution, stop ids."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from otterhd_ray.eval.predictor import Predictor, resize_short_side


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_dir):
    from otterhd_ray.data.tokenizer import load_tokenizer
    from otterhd_ray.models.fuyu.config import config_for_tokenizer, flavour_config
    from otterhd_ray.models.fuyu.model import new_model

    tok = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    return new_model(config_for_tokenizer(flavour_config("debug"), tok)), tok


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _batch(images: list[bytes]) -> dict[str, np.ndarray]:
    n = len(images)
    return {
        "id": np.asarray([f"i{k}" for k in range(n)], dtype=object),
        "image": np.asarray(images, dtype=object),
        "mc_text": np.asarray(["What color? A. red, B. blue"] * n, dtype=object),
        "ff_text": np.asarray(["What color?"] * n, dtype=object),
    }


def test_resize_short_side():
    img = Image.new("RGB", (200, 100))
    assert resize_short_side(img, -1).size == (200, 100)
    assert resize_short_side(img, 150).size == (300, 150)
    assert resize_short_side(img, 50).size == (100, 50)


def test_both_questions_fixed_length_and_bad_image_isolated(tiny):
    model, tok = tiny
    pred = Predictor.from_model(model, tok, resolution=60, max_new_tokens=3, stop_ids=[])
    out = pred(_batch([_jpeg(120, 90), b"not an image", _jpeg(64, 48)]))
    assert list(out["id"]) == ["i0", "i1", "i2"]
    assert out["error"][0] == "" and out["error"][2] == ""
    assert (
        "undecodable_image" in out["error"][1]
        and out["mc_response"][1] == ""
        and out["num_new_tokens"][1] == 0
    )
    # stop_ids=[]: exactly 3 new tokens for each of the two questions of a good item
    assert out["num_new_tokens"][0] == 6 and out["num_new_tokens"][2] == 6
    # resolution 60 on a 120x90 image: short side 90 -> 60, 80x60 -> 3x2 patches (+ newline per row) + text
    assert out["num_prompt_tokens"][0] > 2 * (3 * 3)
    assert torch.is_grad_enabled()  # the predictor does not switch autograd off for the whole process


def test_default_stop_ids_come_from_the_tokenizer(tiny):
    from otterhd_ray.data.tokenizer import fuyu_tokens

    model, tok = tiny
    pred = Predictor.from_model(model, tok, max_new_tokens=2)
    assert fuyu_tokens(tok).end in pred.stop_ids


@pytest.mark.parametrize("size", [(120, 90), (31, 29), (2000, 400)])
def test_prompt_layout_equals_the_processor(tiny, size):
    """The predictor patchifies once per item and builds ids itself: it must equal encode_prompt exactly."""
    from otterhd_ray.data.processor import resize_image

    model, tok = tiny
    pred = Predictor.from_model(model, tok, resolution=-1, max_new_tokens=1)
    data = _jpeg(*size)
    patches, grid = pred._prepare_image(data)
    from otterhd_ray.data.images import decode_image

    image = resize_image(decode_image(data, 10**8))
    for text in ("User: What color? A. red, B. blue Assistant:", "How many?"):
        ref = pred.processor.encode_prompt(image, text)
        assert pred._prompt_ids(grid, text).tolist() == ref["input_ids"].tolist()
        assert torch.equal(patches, torch.from_numpy(ref["patches"]))


def test_shared_prefix_gives_the_same_answers_and_groups_each_items_questions(tiny, monkeypatch):
    """Both questions of an item share the image prefix (prefilled once); answers equal the unshared path's."""
    import otterhd_ray.models.fuyu.generate as generate_module

    model, tok = tiny
    seen = []
    real = generate_module.prefix_groups
    monkeypatch.setattr(generate_module, "prefix_groups", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    # resolution -1: 300x200 -> 7 rows x (10 patches + |NEWLINE|) = 77 image tokens, 240x150 -> 5 x 9 = 45
    batch = _batch([_jpeg(300, 200), b"not an image", _jpeg(240, 150), _jpeg(300, 200)])
    ref = Predictor.from_model(model, tok, max_new_tokens=4, stop_ids=[], share_prefix=False)(batch)
    assert not seen  # the reference path does not group
    got = Predictor.from_model(model, tok, max_new_tokens=4, stop_ids=[])(batch)
    assert [m for m, _ in seen[0]] == [[0, 1], [2, 3], [4, 5]]  # three good items, two prompts each
    assert [p > n for (_, p), n in zip(seen[0], (77, 45, 77), strict=True)] == [True] * 3  # image + <s> (+ text)
    for key in ("mc_response", "ff_response", "num_prompt_tokens", "num_new_tokens"):
        assert list(got[key]) == list(ref[key]), key
    assert [bool(e) for e in got["error"]] == [False, True, False, False]
    assert got["num_new_tokens"][0] == 8
