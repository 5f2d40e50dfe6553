"""Parity of our processor with transformers 5.17's Fuyu processor, built offline from the tiny tokenizer.

Reference path = what a transformers user gets: `transformers.image_utils.load_image(path)` (EXIF orientation +
`convert("RGB")`) -> `transformers.FuyuProcessor(images=..., text=...)` with `FuyuImageProcessor`, which
resolves to `FuyuImageProcessorPil` here (no torchvision). Ours: `decode_image(bytes)` ->
`FuyuProcessor.encode_prompt`. Compared exactly: token ids, the patch grid, and the float32 patches after
`normalize_patches` (bit-identical, `torch.equal`).

REFERENCE.md warns that in transformers 5.24 `FuyuProcessor.__call__` + the PIL image processor crashes
(`transpose() takes 2 positional arguments`). In the pinned 5.17 it runs, so the full public call is the oracle;
`test_tokenizer_info_path_agrees` also checks the lower-level `preprocess_with_tokenizer_info` route, the one to
fall back on if a later pin brings the crash back.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from transformers import FuyuImageProcessor  # noqa: E402
from transformers import FuyuProcessor as HFFuyuProcessor  # noqa: E402
from transformers.image_utils import load_image  # noqa: E402

from otterhd_ray.data.images import decode_image  # noqa: E402
from otterhd_ray.data.processor import PAD_PIXEL, FuyuProcessor, image_to_patches  # noqa: E402
from otterhd_ray.data.tokenizer import load_tokenizer  # noqa: E402
from otterhd_ray.models.fuyu.inputs import NORMALIZE_LUT, normalize_patches  # noqa: E402

MAX_PIXELS = 89_478_485
PROMPTS = [
    "Generate a coco-style caption.\n",
    "User:What is the color of the small object at the top left? Assistant:",
    "",
    "héllo “wörld” 日本 <box>1, 2, 3, 4</box>  two  spaces",
]


def test_transformers_version_is_pinned():
    # The oracle's behaviour (pad before rescale, the PIL backend, the processor's token construction) is that of
    # 5.17; a new version must be re-verified before these tests mean anything.
    assert transformers.__version__ == "5.17.0"


# --------------------------------------------------------------------------------------------- images
def _rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": 90}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _cases() -> dict[str, bytes]:
    rng = np.random.default_rng(1234)
    cases = {
        "1x1": _png(Image.fromarray(_rgb(rng, 1, 1))),
        "29x31": _png(Image.fromarray(_rgb(rng, 29, 31))),
        "4000x300": _png(Image.fromarray(_rgb(rng, 4000, 300))),
        "300x4000": _png(Image.fromarray(_rgb(rng, 300, 4000))),
        "1080x1920": _png(Image.fromarray(_rgb(rng, 1080, 1920))),
        "1920x1080": _png(Image.fromarray(_rgb(rng, 1920, 1080))),
        "3000x3000_jpeg": _jpeg(Image.fromarray(_rgb(rng, 3000, 3000))),
        "gray": _png(Image.fromarray(rng.integers(0, 256, (97, 61), dtype=np.uint8))),
        "gray_alpha": _png(Image.fromarray(rng.integers(0, 256, (45, 70, 2), dtype=np.uint8), mode="LA")),
        "rgba": _png(Image.fromarray(rng.integers(0, 256, (64, 95, 4), dtype=np.uint8))),
        "1bit": _png(Image.fromarray(rng.integers(0, 2, (40, 33), dtype=np.uint8) * 255).convert("1")),
        "16bit": _png(Image.fromarray(rng.integers(0, 65536, (50, 77), dtype=np.uint16))),
        "16bit_low": _png(Image.fromarray(rng.integers(0, 256, (50, 77), dtype=np.uint16))),
        "cmyk_jpeg": _jpeg(Image.fromarray(_rgb(rng, 70, 90)).convert("CMYK")),
    }
    palette = Image.fromarray(_rgb(rng, 83, 129)).quantize(colors=37)
    cases["palette"] = _png(palette)
    palette.info["transparency"] = 3
    cases["palette_transparent"] = _png(palette)
    for orientation in (3, 6, 8):
        cases[f"exif{orientation}_jpeg"] = _jpeg(Image.fromarray(_rgb(rng, 120, 200)), orientation)
    return cases


CASES = _cases()


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_processor(tiny_tokenizer_dir):
    # A separately loaded tokenizer: HF's processor mutates it (pad_token_id = 0).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image_processor = FuyuImageProcessor()
    return HFFuyuProcessor(image_processor=image_processor, tokenizer=load_tokenizer(tiny_tokenizer_dir))


@pytest.fixture(scope="module")
def ours(tokenizer):
    return FuyuProcessor(tokenizer)


def _reference_image(data: bytes, tmp_path) -> Image.Image:
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    return load_image(str(path))


def _hf(hf_processor, image: Image.Image, prompt: str):
    out = hf_processor(images=image, text=prompt, return_tensors="pt")
    # HF squeezes the patch tensor, so a one-patch image comes back as [2700]; our contract is always [P, 2700].
    return out["input_ids"][0], out["image_patches"].reshape(-1, 2700)


# ------------------------------------------------------------------------------------------------ tests
def test_hf_image_processor_is_the_pil_backend(hf_processor):
    # Documents which oracle ran; the torchvision backend would need its own verification.
    assert type(hf_processor.image_processor).__name__ == "FuyuImageProcessorPil"


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_matches_transformers_load_image(name, tmp_path):
    reference = _reference_image(CASES[name], tmp_path)
    decoded = decode_image(CASES[name], MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.size == reference.size
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(reference))


@pytest.mark.parametrize("name", sorted(CASES))
def test_prompt_parity(name, tmp_path, hf_processor, ours):
    reference_image = _reference_image(CASES[name], tmp_path)
    image = decode_image(CASES[name], MAX_PIXELS)
    prompt = PROMPTS[sorted(CASES).index(name) % len(PROMPTS)]
    ref_ids, ref_patches = _hf(hf_processor, reference_image, prompt)
    sample = ours.encode_prompt(image, prompt)

    assert sample["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(sample["input_ids"], ref_ids.numpy())
    assert sample["num_tokens"] == len(ref_ids)
    rows, cols = (int(v) for v in sample["grid"])
    image_part = ref_ids[: rows * (cols + 1)].reshape(rows, cols + 1)
    assert bool((image_part[:, -1] == ours.tokens.newline).all())
    assert bool((image_part[:, :-1] == ours.tokens.image).all())

    assert sample["patches"].dtype == np.uint8
    assert sample["patches"].shape == tuple(ref_patches.shape) == (rows * cols, 2700)
    assert torch.equal(normalize_patches(torch.from_numpy(sample["patches"])), ref_patches)
    np.testing.assert_array_equal(normalize_patches(sample["patches"]), ref_patches.numpy())


def test_padding_lands_on_pixel_value_one(hf_processor, tmp_path):
    # HF pads the uint8 image with padding_value=1.0 before rescaling, so padded pixels are the integer 1.
    reference_image = _reference_image(CASES["29x31"], tmp_path)
    _, ref_patches = _hf(hf_processor, reference_image, "x")
    patch_HWC = ref_patches[0].reshape(30, 30, 3).numpy()
    assert PAD_PIXEL == 1
    assert (patch_HWC[29, :, :] == NORMALIZE_LUT[1]).all()  # row 29 is below the 29-pixel-high image
    assert (patch_HWC[:29, :29, :] != NORMALIZE_LUT[1]).any()


@pytest.mark.parametrize("bucket", [(448, 448), (512, 288), (768, 1024), (1000, 601), (30, 30)])
def test_bucket_size_matches_hf_on_the_resized_image(bucket, hf_processor):
    # With size=(h, w) we resize exactly; HF never enlarges and keeps aspect, so feed it the same PIL bilinear
    # resize and check our padding and patch emission agree with its for non-multiple-of-30 sizes.
    rng = np.random.default_rng(7)
    image = Image.fromarray(_rgb(rng, 700, 1300))
    resized = image.resize((bucket[1], bucket[0]), resample=Image.Resampling.BILINEAR)
    _, ref_patches = _hf(hf_processor, resized, "q")
    patches, grid = image_to_patches(image, size=bucket)
    assert grid == (-(-bucket[0] // 30), -(-bucket[1] // 30))
    assert torch.equal(normalize_patches(torch.from_numpy(patches)), ref_patches)


def test_tokenizer_info_path_agrees(hf_processor, ours):
    # The lower-level route HF itself keeps for the layout (deprecated, but the fallback oracle).
    rng = np.random.default_rng(3)
    image = Image.fromarray(_rgb(rng, 301, 451))
    image_processor = hf_processor.image_processor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processed = image_processor(image, return_tensors="pt")
        info = image_processor.preprocess_with_tokenizer_info(
            image_input=torch.as_tensor(np.stack(processed["images"][0]))[None],
            image_present=torch.ones(1, 1, 1),
            image_unpadded_h=torch.tensor([[301]]),
            image_unpadded_w=torch.tensor([[451]]),
            image_placeholder_id=ours.tokens.image,
            image_newline_id=ours.tokens.newline,
            variable_sized=True,
        )
    sample = ours.encode_prompt(image, "")
    num_image_ids = len(info["image_input_ids"][0][0])
    np.testing.assert_array_equal(sample["input_ids"][:num_image_ids], info["image_input_ids"][0][0].numpy())
    assert sample["input_ids"][num_image_ids] == ours.tokens.bos
    assert torch.equal(normalize_patches(torch.from_numpy(sample["patches"])), info["image_patches"][0][0])


def test_hf_model_accepts_our_sample(tokenizer, ours):
    # End-to-end contract: HF's FuyuForCausalLM scatters our patches into our |SPEAKER| positions.
    from transformers import FuyuConfig, FuyuForCausalLM

    config = FuyuConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_token_id=ours.tokens.image,
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
    )
    torch.manual_seed(0)
    model = FuyuForCausalLM(config).eval()
    image = Image.fromarray(_rgb(np.random.default_rng(5), 65, 95))
    sample = ours.encode_conversation(
        image, [{"role": "user", "text": "What is it?"}, {"role": "assistant", "text": "A cat."}]
    )
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(sample["input_ids"]).long()[None],
            image_patches=normalize_patches(torch.from_numpy(sample["patches"]))[None],
            labels=torch.from_numpy(sample["labels"]).long()[None],
        )
    assert torch.isfinite(out.loss)
