"""Image decoding: modes, EXIF orientation, refusals (BadSample reasons), bombs, truncation, JPEG draft."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from otterhd_ray.data.images import BadSample, decode_image, image_size
from otterhd_ray.data.processor import image_to_patches

MAX_PIXELS = 89_478_485


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like image (smooth gradients + mild noise) so JPEG behaves as on real data."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16
    )
    return (smooth + rng.integers(-12, 12, smooth.shape)).clip(0, 255).astype(np.uint8)


def _reference(data: bytes) -> np.ndarray:
    """What transformers' load_image gives: open, exif_transpose, convert("RGB")."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def _with_exif(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(image, "JPEG", quality=92, exif=exif.tobytes())


def _png_with_header_size(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR claims (width, height): a bomb header over a tiny payload."""
    data = bytearray(_encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG"))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


# ---------------------------------------------------------------------------------------------- modes
MODES = {
    "RGB": lambda rng: Image.fromarray(rng.integers(0, 256, (21, 34, 3), dtype=np.uint8)),
    "L": lambda rng: Image.fromarray(rng.integers(0, 256, (21, 34), dtype=np.uint8)),
    "LA": lambda rng: Image.fromarray(rng.integers(0, 256, (21, 34, 2), dtype=np.uint8), mode="LA"),
    "RGBA": lambda rng: Image.fromarray(rng.integers(0, 256, (21, 34, 4), dtype=np.uint8)),
    "P": lambda rng: Image.fromarray(rng.integers(0, 256, (21, 34, 3), dtype=np.uint8)).quantize(17),
    "1": lambda rng: Image.fromarray(rng.integers(0, 2, (21, 34), dtype=np.uint8) * 255).convert("1"),
    "I;16": lambda rng: Image.fromarray(rng.integers(0, 65536, (21, 34), dtype=np.uint16)),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_every_mode_becomes_rgb_like_transformers(mode, fmt):
    image = MODES[mode](np.random.default_rng(0))
    data = _encode(image, fmt)
    decoded = decode_image(data, MAX_PIXELS)
    assert decoded.mode == "RGB" and decoded.size == image.size
    np.testing.assert_array_equal(np.asarray(decoded), _reference(data))


def test_palette_with_transparency_and_gif():
    image = MODES["P"](np.random.default_rng(1))
    image.info["transparency"] = 2
    for fmt in ("PNG", "GIF"):
        data = _encode(image, fmt)
        np.testing.assert_array_equal(np.asarray(decode_image(data, MAX_PIXELS)), _reference(data))


def test_rgba_alpha_is_dropped_not_composited():
    # transformers' convert("RGB") keeps the stored colour of transparent pixels; so do we, on purpose.
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    decoded = np.asarray(decode_image(_encode(Image.fromarray(rgba), "PNG"), MAX_PIXELS))
    assert (decoded[..., 0] == 200).all() and (decoded[..., 1:] == 0).all()


def test_cmyk_and_webp_and_bmp():
    rgb = Image.fromarray(_smooth_rgb(40, 50))
    for data in (
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb, "WEBP", quality=80),
        _encode(rgb, "BMP"),
    ):
        np.testing.assert_array_equal(np.asarray(decode_image(data, MAX_PIXELS)), _reference(data))


def test_16bit_default_matches_transformers_clipping_and_scale_option():
    values = np.array([[0, 1, 255, 256], [4095, 32768, 65280, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    clipped = np.asarray(decode_image(data, MAX_PIXELS))[..., 0]
    np.testing.assert_array_equal(clipped, np.minimum(values, 255))  # Pillow's I;16 -> RGB, what HF sees
    scaled = np.asarray(decode_image(data, MAX_PIXELS, scale_16bit=True))
    np.testing.assert_array_equal(scaled[..., 0], values >> 8)
    assert (scaled[..., 0] == scaled[..., 2]).all()


# ------------------------------------------------------------------------------------------------ EXIF
@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied(orientation):
    data = _with_exif(Image.fromarray(_smooth_rgb(40, 70)), orientation)
    decoded = decode_image(data, MAX_PIXELS)
    reference = _reference(data)
    np.testing.assert_array_equal(np.asarray(decoded), reference)
    assert image_size(data, MAX_PIXELS) == reference.shape[:2]
    assert reference.shape[:2] == ((70, 40) if orientation >= 5 else (40, 70))


# ------------------------------------------------------------------------------------------- refusals
def _reason(data, max_pixels=MAX_PIXELS) -> str:
    with pytest.raises(BadSample) as err:
        decode_image(data, max_pixels)
    assert isinstance(err.value, ValueError)
    return err.value.reason


def test_empty_bytes():
    assert _reason(b"") == "empty_image"


@pytest.mark.parametrize(
    "data",
    [
        b"this is not an image",
        bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",  # EPS would shell out to Ghostscript
        b"\x89PNG\r\n\x1a\n",  # a signature and nothing else
    ],
)
def test_undecodable(data):
    assert _reason(data) == "undecodable_image"


def test_not_bytes():
    assert _reason("a path, not bytes") == "undecodable_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.3, 0.7])
def test_truncated(fmt, keep):
    data = _encode(Image.fromarray(_smooth_rgb(200, 300)), fmt)
    assert _reason(data[: int(len(data) * keep)]) == "truncated_image"


def test_bomb_refused_from_header_before_decoding():
    # The payload is 8x8: had anything been decoded, it would fail as truncated, not as too large.
    bomb = _png_with_header_size(30_000, 30_000)  # 900 M pixels, above Pillow's own hard limit too
    assert _reason(bomb) == "image_too_large"
    below_pillow = _png_with_header_size(12_000, 10_000)  # 120 M: only our limit catches it
    assert _reason(below_pillow) == "image_too_large"
    assert _reason(below_pillow, max_pixels=200_000_000) == "truncated_image"


def test_max_pixels_limit_on_a_real_image():
    data = _encode(Image.fromarray(_smooth_rgb(100, 100)), "PNG")
    assert _reason(data, max_pixels=9_999) == "image_too_large"
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(BadSample, match="image_too_large"):
        image_size(data, 9_999)


def test_bad_max_pixels_is_a_user_error():
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b"x", 0)


# ------------------------------------------------------------------------------------------------ draft
def test_draft_is_off_by_default_and_close_when_on():
    source = Image.fromarray(_smooth_rgb(1800, 2400, seed=3))
    data = _encode(source, "JPEG", quality=90)
    bucket = (225, 300)  # (h, w), 8x smaller than the source

    full = decode_image(data, MAX_PIXELS)
    assert full.size == (2400, 1800)
    np.testing.assert_array_equal(np.asarray(full), _reference(data))

    drafted = decode_image(data, MAX_PIXELS, draft_target=bucket)
    assert drafted.size == (600, 450)  # 1/4 scale: the largest DCT reduction keeping >= 2x the bucket
    ours, _ = image_to_patches(drafted, size=bucket)
    reference, _ = image_to_patches(full, size=bucket)
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    # Measured here: mean 0.38 grey levels, max 3; the bounds leave room for other libjpeg builds.
    assert diff.mean() < 1.0, diff.mean()
    assert diff.max() <= 8


def test_draft_respects_exif_rotation():
    data = _with_exif(Image.fromarray(_smooth_rgb(1200, 2400)), 6)  # displayed 2400 high, 1200 wide
    drafted = decode_image(data, MAX_PIXELS, draft_target=(600, 300))  # displayed (h, w)
    # half scale, then rotated: 600 wide x 1200 high (ignoring the rotation would have blocked any reduction)
    assert drafted.size == (600, 1200)


def test_draft_is_a_no_op_for_png_and_small_jpegs():
    png = _encode(Image.fromarray(_smooth_rgb(300, 400)), "PNG")
    assert decode_image(png, MAX_PIXELS, draft_target=(30, 40)).size == (400, 300)
    jpeg = _encode(Image.fromarray(_smooth_rgb(300, 400)), "JPEG")
    np.testing.assert_array_equal(
        np.asarray(decode_image(jpeg, MAX_PIXELS, draft_target=(200, 266))), _reference(jpeg)
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@pytest.mark.parametrize("where", ["pillow", "after_idat"])
def test_png_exif_orientation_read_without_decoding(where):
    image = Image.fromarray(_smooth_rgb(40, 70))
    exif = Image.Exif()
    exif[0x0112] = 6
    if where == "pillow":
        data = _encode(image, "PNG", exif=exif.tobytes())
    else:  # an eXIf chunk after the pixel data: only found by walking the chunks (or decoding everything)
        plain = _encode(image, "PNG")
        iend = plain.rindex(b"IEND") - 4
        data = plain[:iend] + _png_chunk(b"eXIf", exif.tobytes()[6:]) + plain[iend:]  # chunk holds TIFF data
    reference = _reference(data)
    assert reference.shape[:2] == (70, 40)
    assert image_size(data, MAX_PIXELS) == (70, 40)
    np.testing.assert_array_equal(np.asarray(decode_image(data, MAX_PIXELS)), reference)


def test_image_size_reads_only_the_header():
    data = _encode(Image.fromarray(_smooth_rgb(200, 300)), "PNG")
    truncated = data[: len(data) // 2]  # decoding would fail; the header is intact
    assert image_size(truncated, MAX_PIXELS) == (200, 300)
    jpeg = _with_exif(Image.fromarray(_smooth_rgb(200, 300)), 8)
    assert image_size(jpeg[: len(jpeg) // 2], MAX_PIXELS) == (300, 200)
