"""Image decoding: bytes -> RGB `PIL.Image`, exactly as transformers would see the image, with bad input refused.

Reference path (what `transformers.image_utils.load_image` does before the Fuyu image processor):
`Image.open` -> `ImageOps.exif_transpose` -> `.convert("RGB")`. `decode_image` gives the same pixels for every mode
(L, LA, RGBA, P, CMYK, I;16, I, F, ...), so the eval parity holds. Two consequences of matching it, on purpose:
alpha is dropped, not composited (transparent pixels show whatever RGB they store), and 16-bit images are
*clipped* to 255 by Pillow, not scaled; `scale_16bit=True` scales them instead (better for training on real
16-bit data, but no longer what transformers sees).

Refusals raise `BadSample(reason)` with a short machine-readable reason code (the rejects table's `reason`):
`empty_image`, `undecodable_image`, `truncated_image`, `image_too_large`.

Speed: `draft_target=(h, w)` lets a JPEG decode at 1/2, 1/4 or 1/8 scale through the DCT (`Image.draft`), but
only while the decoded image stays at least `DRAFT_MARGIN`x the target on both sides, so the bucket resize still
does a >= 2x antialiased reduction; after that resize the patches differ from the full-decode path by 0.3-0.4 grey
levels on average, 3 at most (smooth photo-like 1800x2400 and 2400x3200 JPEGs; tests/unit/test_images.py). Default off: eval/parity mode must not use it; the training
pipeline may turn it on for buckets much smaller than the source.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we decode; anything else (EPS/PDF through Ghostscript, ICNS, ...) is refused as undecodable rather than
# handed to a plugin that may shell out or parse exotic containers. (Phone cameras' multi-picture JPEGs open through
# the JPEG plugin and report format "MPO".)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DRAFT_MARGIN = 2

_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class BadSample(ValueError):
    """A sample that cannot be used; `reason` is a short code for the rejects table."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only, nothing decoded yet) and check the size before any pixel is decompressed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadSample("undecodable_image", f"image must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise BadSample("empty_image", "no image bytes")
    try:
        with warnings.catch_warnings():
            # We apply our own limit below; Pillow's warning (or its error at 2x its global limit) says the same.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as err:
        # Pillow's own guard (2x its global limit) fired first; say *our* limit, as the header check below does.
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{found.group(1)} pixels" if found else "more pixels than Pillow allows"
        raise BadSample("image_too_large", f"{pixels} > limit {max_pixels}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise BadSample("undecodable_image", f"{type(err).__name__}: {err}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadSample("empty_image", f"size {width}x{height}")
    if width * height > max_pixels:
        raise BadSample("image_too_large", f"{width}x{height} = {width * height} pixels > limit {max_pixels}")
    return image


def _orientation(image: Image.Image) -> int:
    """EXIF orientation of an opened image. For PNG, Pillow's `getexif()` decodes the whole image first (an
    eXIf chunk may follow the pixel data), so call this on PNGs only after `load()`, or use `_header_orientation`."""
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # a corrupt EXIF block: transformers' exif_transpose would fail too; treat as upright
        return 1


def _png_exif_chunk(data: bytes) -> bytes | None:
    """The eXIf chunk of a PNG, found by walking chunk headers (no decompression)."""
    view = memoryview(data)
    pos = 8  # after the signature
    while pos + 8 <= len(view):
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        if kind == b"eXIf":
            return bytes(view[pos + 8 : pos + 8 + length])
        if kind == b"IEND":
            break
        pos += 12 + length  # length, type, data, crc
    return None


def _header_orientation(image: Image.Image, data: bytes) -> int:
    """EXIF orientation without decoding pixels (JPEG, WebP, TIFF keep EXIF in their headers; PNG is scanned)."""
    if image.format != "PNG":
        return _orientation(image)
    chunk = image.info.get("exif") or _png_exif_chunk(data)
    if not chunk:
        return 1
    try:
        exif = Image.Exif()
        exif.load(chunk)
        return int(exif.get(_ORIENTATION_TAG, 1) or 1)
    except Exception:
        return 1


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), read from the header without decoding pixels.

    For choosing a resolution bucket before `decode_image(..., draft_target=bucket)`.
    """
    image = _open(data, max_pixels)
    width, height = image.size
    if _header_orientation(image, data) in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return height, width


def decode_image(
    data: bytes,
    max_pixels: int,
    draft_target: tuple[int, int] | None = None,
    scale_16bit: bool = False,
) -> Image.Image:
    """Decode `data` into an RGB image as transformers' `load_image` would (EXIF orientation, `.convert("RGB")`).

    `max_pixels` is the decompression-bomb limit, checked against the header before decoding.
    `draft_target` = final (height, width) after the bucket resize, to allow a JPEG draft decode (see module doc).
    Raises `BadSample` for empty, undecodable, truncated or too-large images.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    image = _open(data, max_pixels)
    if draft_target is not None and image.format in ("JPEG", "MPO"):
        target_h, target_w = draft_target
        if _header_orientation(image, data) in _TRANSPOSED_ORIENTATIONS:
            target_h, target_w = target_w, target_h
        # draft() picks the largest DCT reduction whose output is still >= the requested size.
        image.draft("RGB", (DRAFT_MARGIN * target_w, DRAFT_MARGIN * target_h))
    try:
        image.load()
    except Image.DecompressionBombError as err:
        raise BadSample("image_too_large", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as err:
        message = f"{type(err).__name__}: {err}"
        truncated = isinstance(err, EOFError) or "truncat" in str(err).lower()
        raise BadSample("truncated_image" if truncated else "undecodable_image", message) from None
    orientation = _orientation(image)  # after load(): exactly the EXIF transformers' exif_transpose reads
    try:
        with warnings.catch_warnings():
            # Pillow warns that palette images with transparency bytes "should be converted to RGBA"; we
            # drop alpha exactly as transformers' convert("RGB") does.
            warnings.simplefilter("ignore")
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            if scale_16bit and image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
            if image.mode != "RGB":
                image = image.convert("RGB")
    except (OSError, ValueError) as err:
        raise BadSample("undecodable_image", f"cannot convert {image.mode} to RGB: {err}") from None
    return image
