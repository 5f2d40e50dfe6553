"""Our Fuyu processor: normalisation, patch order, resize policy, conversation layout and label masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from otterhd_ray.config import SEED_TRAIN_TEMPLATE
from otterhd_ray.data.images import BadSample
from otterhd_ray.data.processor import (
    PAD_PIXEL,
    FuyuProcessor,
    hf_resized_size,
    image_to_patches,
    validate_conversation,
)
from otterhd_ray.data.tokenizer import load_tokenizer
from otterhd_ray.models.fuyu import IGNORE_INDEX, normalize_patches


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def proc(tok):
    return FuyuProcessor(tok)


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _conv(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "text": t} for i, t in enumerate(texts)]


# ------------------------------------------------------------------------------------------ normalise
def test_normalize_matches_hf_formula_for_every_pixel_value():
    x = np.arange(256, dtype=np.uint8)
    # transformers: rescale in float64 then cast to float32, normalise in float32
    expected = ((x.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    out = normalize_patches(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    out_t = normalize_patches(torch.from_numpy(x.reshape(16, 16)))
    assert out_t.dtype == torch.float32 and out_t.shape == (16, 16)
    np.testing.assert_array_equal(out_t.numpy().reshape(-1), expected)
    assert out[0] == -1.0 and out[255] == 1.0


def test_normalize_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        normalize_patches(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        normalize_patches(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        normalize_patches([1, 2, 3])


# ------------------------------------------------------------------------------------------- patches
def test_patch_order_and_flattening():
    # Each pixel encodes its own position: patch p must hold rows [30r, 30r+30) x cols [30c, 30c+30), flattened
    # (row, col, channel) -- Fuyu's order.
    height, width = 60, 90
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([yy, xx, (yy // 30) * 3 + xx // 30], axis=-1).astype(np.uint8)
    patches, grid = image_to_patches(Image.fromarray(pixels), size=None)
    assert grid == (2, 3) and patches.shape == (6, 2700) and patches.dtype == np.uint8
    for p in range(6):
        r, c = divmod(p, 3)
        patch = patches[p].reshape(30, 30, 3)
        np.testing.assert_array_equal(patch, pixels[30 * r : 30 * r + 30, 30 * c : 30 * c + 30])
        assert (patch[..., 2] == p).all()
    assert patches[0][(5 * 30 + 7) * 3 + 1] == 7  # pixel (5, 7), channel 1 (x) at index (row*30 + col)*3 + ch


def test_padding_and_grid_for_non_multiples():
    patches, grid = image_to_patches(_image(31, 29), size=None)
    assert grid == (2, 1)
    bottom = patches[1].reshape(30, 30, 3)
    assert (bottom[1:] == PAD_PIXEL).all()  # rows 31.. padded
    right = patches[0].reshape(30, 30, 3)
    assert (right[:, 29] == PAD_PIXEL).all()  # column 29 padded
    assert patches.flags.writeable and patches.flags.c_contiguous and patches.flags.owndata


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((1, 1), (1, 1)),
        ((1080, 1920), (1080, 1920)),
        ((500, 700), (500, 700)),  # never enlarged
        ((2160, 3840), (1080, 1920)),
        ((4000, 300), (1080, 81)),
        ((300, 4000), (144, 1920)),
        ((3000, 3000), (1080, 1080)),
    ],
)
def test_hf_resize_policy(hw, expected):
    assert hf_resized_size(*hw) == expected


def test_size_resizes_exactly_and_records_the_bucket(proc):
    sample = proc.encode_prompt(_image(700, 1300), "q", size=(448, 832))
    assert sample["bucket"].tolist() == [448, 832] and sample["bucket"].dtype == np.int32
    assert sample["grid"].tolist() == [15, 28]  # ceil(448/30), ceil(832/30)
    enlarged = proc.encode_prompt(
        _image(20, 20), "q", size=(60, 90)
    )  # buckets may enlarge; HF's None never does
    assert enlarged["grid"].tolist() == [2, 3]
    native = proc.encode_prompt(_image(2160, 3840), "q")
    assert native["bucket"].tolist() == [1080, 1920] and native["grid"].tolist() == [36, 64]
    with pytest.raises(ValueError, match="positive"):
        image_to_patches(_image(10, 10), size=(0, 10))


def test_non_rgb_input_is_converted(proc):
    gray = Image.fromarray(np.full((30, 30), 77, dtype=np.uint8))
    sample = proc.encode_prompt(gray, "q")
    assert (sample["patches"] == 77).all() and sample["patches"].shape == (1, 2700)


# --------------------------------------------------------------------------------------------- layout
def test_prompt_layout(tok, proc):
    t = proc.tokens
    sample = proc.encode_prompt(_image(45, 61), "What is it?")
    expected = (
        [t.image] * 3 + [t.newline] + [t.image] * 3 + [t.newline] + [t.bos] + _ids(tok, "What is it?<0x04>")
    )
    assert sample["input_ids"].tolist() == expected
    assert sample["input_ids"][-1] == t.boa
    assert (sample["labels"] == IGNORE_INDEX).all()
    assert sample["num_tokens"] == len(expected) and sample["num_tokens"].dtype == np.int32


def test_single_turn_layout_and_labels(tok, proc):
    t = proc.tokens
    sample = proc.encode_conversation(_image(30, 60), _conv("What colour is the car?", "Red."))
    image_part = [t.image, t.image, t.newline, t.bos]
    prompt = _ids(tok, "User:What colour is the car? Assistant:<0x04>")
    answer = _ids(tok, " Red.") + [t.end]
    assert sample["input_ids"].tolist() == image_part + prompt + answer
    assert sample["labels"].tolist() == [IGNORE_INDEX] * (len(image_part) + len(prompt)) + answer
    assert tok.decode(answer[:-1]) == "Red."
    assert sample["patches"].shape == (2, 2700)
    assert set(sample) == {"input_ids", "labels", "patches", "grid", "bucket", "num_tokens"}
    assert sample["input_ids"].dtype == np.int32 and sample["labels"].dtype == np.int32


def test_multi_turn_supervises_every_answer(tok, proc):
    t = proc.tokens
    turns = ("Q one?", "First answer.", "Q two?", "Second.", "Q three?", "Third one here.")
    sample = proc.encode_conversation(_image(90, 90), _conv(*turns))
    ids, labels = sample["input_ids"], sample["labels"]
    supervised = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[supervised], ids[supervised])  # unshifted HF convention
    # three supervised spans, each = answer tokens + end
    spans = np.split(labels, np.flatnonzero(np.diff(supervised.astype(np.int8))) + 1)
    answers = [s.tolist() for s in spans if s[0] != IGNORE_INDEX]
    assert answers == [_ids(tok, " " + a) + [t.end] for a in turns[1::2]]
    # image once, at the start; one <s>; a <0x04> per turn; nothing of the prompts supervised
    assert (ids == t.image).sum() == sample["patches"].shape[0] == 9
    assert (ids == t.bos).sum() == 1 and ids[3 * 4] == t.bos
    assert (ids == t.boa).sum() == 3 and (labels[ids == t.boa] == IGNORE_INDEX).all()
    assert (labels[ids == t.end] == t.end).all() and (ids == t.end).sum() == 3
    assert (labels[: 3 * 4 + 1] == IGNORE_INDEX).all()


def test_text_only_encodings_match_the_full_layout(proc):
    """encode_text / encode_turns / num_text_tokens are exactly the text part of encode_prompt /
    encode_conversation (what the eval predictor and the pipeline's index use, with no image work)."""
    for hw in ((45, 61), (30, 30), (95, 7)):
        image = _image(*hw)
        grid = proc.encode_prompt(image, "x")["grid"].tolist()
        num_image = grid[0] * (grid[1] + 1) + 1  # rows x (cols + |NEWLINE|), then <s>
        full = proc.encode_prompt(image, "What is it?")
        assert proc.encode_text("What is it?") == full["input_ids"][num_image:].tolist()
        conv = _conv("Q one?", "First.", "Q two?", "Second answer.")
        sample = proc.encode_conversation(image, conv)
        ids, labels = proc.encode_turns(conv)
        assert ids == sample["input_ids"][num_image:].tolist() and labels == sample["labels"][num_image:].tolist()
        assert proc.num_text_tokens(conv) == sample["num_tokens"] - (num_image - 1)
    with pytest.raises(BadSample, match="missing_text"):
        proc.encode_text(None)
    with pytest.raises(BadSample) as err:
        proc.num_text_tokens(_conv("q"))
    assert err.value.reason == "no_assistant_turn"


def test_custom_template(tok):
    proc = FuyuProcessor(tok, instruction_template="Question: {instruction}\nAnswer:")
    sample = proc.encode_conversation(_image(30, 30), _conv("why?", "because"))
    prompt = _ids(tok, "Question: why?\nAnswer:<0x04>")
    assert sample["input_ids"].tolist()[3 : 3 + len(prompt)] == prompt
    assert SEED_TRAIN_TEMPLATE == "User:{instruction} Assistant:"


def test_template_without_instruction_is_rejected(tok):
    with pytest.raises(ValueError, match="instruction"):
        FuyuProcessor(tok, instruction_template="User: Assistant:")
    # the seed's literal "\x04" belongs to the layout, not the template: the processor appends "<0x04>" itself
    for template in (
        "User:{instruction} Assistant:\x04",
        "{instruction}|SPEAKER|",
        "{instruction}|ENDOFTEXT|",
    ):
        with pytest.raises(ValueError, match="unusable"):
            FuyuProcessor(tok, instruction_template=template)


def test_braces_in_text_are_literal(tok, proc):
    sample = proc.encode_conversation(_image(30, 30), _conv("what is {instruction} {0}?", "{x}"))
    assert "{instruction} {0}" in tok.decode(sample["input_ids"][3:])


# ------------------------------------------------------------------------------------------ bad input
BAD = [
    ([], "empty_conversation"),
    (None, "empty_conversation"),
    ("User: hi", "empty_conversation"),
    (_conv("only a question"), "no_assistant_turn"),
    ([{"role": "user", "text": "a"}, {"role": "user", "text": "b"}], "no_assistant_turn"),
    (_conv("q", "a", "q2"), "unanswered_turn"),
    ([{"role": "assistant", "text": "a"}, {"role": "user", "text": "q"}], "bad_turn_order"),
    (_conv("q", "a")[::-1] + _conv("q", "a"), "bad_turn_order"),
    (
        [
            {"role": "user", "text": "q"},
            {"role": "assistant", "text": "a"},
            {"role": "assistant", "text": "b"},
        ],
        "bad_turn_order",
    ),
    ([{"role": "system", "text": "s"}, {"role": "user", "text": "q"}], "bad_role"),
    ([{"role": "human", "text": "q"}, {"role": "gpt", "text": "a"}], "bad_role"),
    ([{"from": "user", "value": "q"}], "bad_role"),
    ([{"role": "user", "text": "q"}, {"role": "assistant", "text": ""}], "missing_text"),
    ([{"role": "user", "text": "   "}, {"role": "assistant", "text": "a"}], "missing_text"),
    ([{"role": "user"}, {"role": "assistant", "text": "a"}], "missing_text"),
    ([{"role": "user", "text": 3}, {"role": "assistant", "text": "a"}], "missing_text"),
    ([{"role": "user", "text": "q"}, "answer"], "bad_turn"),
]


@pytest.mark.parametrize(("conversation", "reason"), BAD)
def test_bad_conversations(proc, conversation, reason):
    with pytest.raises(BadSample) as err:
        proc.encode_conversation(_image(30, 30), conversation)
    assert err.value.reason == reason


def test_image_tokens_in_text_are_refused(proc):
    for conv in (_conv("look |SPEAKER| here", "a"), _conv("q", "a|NEWLINE|b")):
        with pytest.raises(BadSample) as err:
            proc.encode_conversation(_image(30, 30), conv)
        assert err.value.reason == "reserved_token_in_text"
    with pytest.raises(BadSample, match="reserved_token_in_text"):
        proc.encode_prompt(_image(30, 30), "|SPEAKER|")
    # In training text, a boa or end token (the raw \x04 char byte-falls back to <0x04>) would fake a turn
    # boundary or an early stop in the supervision; refused too.
    for conv in (
        _conv("q\x04", "a"),
        _conv("q", "a\x04b"),
        _conv("q", "a|ENDOFTEXT|more"),
        _conv("q<0x04>", "a"),
    ):
        with pytest.raises(BadSample) as err:
            proc.encode_conversation(_image(30, 30), conv)
        assert err.value.reason == "reserved_token_in_text"
    with pytest.raises(BadSample, match="missing_text"):
        proc.encode_prompt(_image(30, 30), None)


def test_validate_conversation_returns_pairs():
    assert validate_conversation(_conv("a", "b", "c", "d")) == [("a", "b"), ("c", "d")]


# ------------------------------------------------------------------------------------------ properties
_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="|\x04"),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip())


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    turns=st.lists(st.tuples(_text, _text), min_size=1, max_size=4),
    hw=st.tuples(st.integers(1, 95), st.integers(1, 95)),
)
def test_layout_invariants(proc, tok, turns, hw):
    conv = _conv(*[t for pair in turns for t in pair])
    sample = proc.encode_conversation(_image(*hw), conv)
    ids, labels, t = sample["input_ids"], sample["labels"], proc.tokens
    rows, cols = sample["grid"].tolist()
    assert (rows, cols) == (-(-hw[0] // 30), -(-hw[1] // 30))
    assert (ids == t.image).sum() == rows * cols == sample["patches"].shape[0]
    assert len(ids) == len(labels) == sample["num_tokens"]
    supervised = labels != IGNORE_INDEX
    assert (labels[supervised] == ids[supervised]).all()
    assert (ids[supervised] == t.end).sum() == len(turns) == (ids == t.boa).sum()
    assert supervised.sum() == sum(len(_ids(tok, " " + a)) + 1 for _, a in turns)
    decoded_answers = [
        tok.decode(s[:-1])
        for s in np.split(labels, np.flatnonzero(np.diff(supervised)) + 1)
        if s[0] != IGNORE_INDEX
    ]
    assert decoded_answers == [a for _, a in turns]  # " " + answer: the decoder strips exactly that space
