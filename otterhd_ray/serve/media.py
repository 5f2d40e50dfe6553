"""`image_url` -> image bytes -> patches, with the serving limits (no torch, no Serve).

Sources: `data:` URIs (base64), http(s) URLs fetched with a timeout and a byte cap, and local paths only when the
operator names a directory (`allow_local_dir`); every refusal is an `APIError` with the status of issue 14:
undecodable or non-image data 400, an image over the pixel cap or the byte cap 413, a fetch that fails 400.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from otterhd_ray.serve.protocol import APIError


@dataclass(frozen=True)
class ImagePolicy:
    max_image_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000  # decoded width x height; checked from the header before decompression
    fetch_timeout_s: float = 10.0
    allow_local_dir: str | None = None  # local paths (or file:// URLs) only under this directory


@dataclass(frozen=True)
class PreparedImage:
    patches_PC: np.ndarray  # uint8 [P, 2700]
    grid: tuple[int, int]
    digest: str  # identifies equal image files (at one resolution): a batch puts their prompts side by side


def _data_uri(url: str, policy: ImagePolicy, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise APIError(400, f"'{param}': only base64 data URIs are supported (data:image/...;base64,...)",
                       param, "invalid_image_url")
    if len(payload) * 3 // 4 > policy.max_image_bytes:
        raise APIError(413, f"'{param}': image is over the {policy.max_image_bytes}-byte limit", param,
                       "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{param}': the data URI is not valid base64", param, "invalid_image") from None


def _fetch(url: str, policy: ImagePolicy, param: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "otterhd-serve"})
    try:
        with urllib.request.urlopen(request, timeout=policy.fetch_timeout_s) as response:  # noqa: S310 (http(s) only)
            data = response.read(policy.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise APIError(400, f"'{param}': could not fetch the image ({type(err).__name__}: {err})"[:300], param,
                       "image_fetch_failed") from None
    if len(data) > policy.max_image_bytes:
        raise APIError(413, f"'{param}': image is over the {policy.max_image_bytes}-byte limit", param,
                       "image_too_large")
    return data


def _local(url: str, policy: ImagePolicy, param: str) -> bytes:
    if policy.allow_local_dir is None:
        raise APIError(400, f"'{param}': local image paths are not allowed on this server (use a data: or "
                       "http(s) URL)", param, "invalid_image_url")
    path = urllib.parse.urlparse(url).path if url.startswith("file://") else url
    root = Path(policy.allow_local_dir).resolve()
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise APIError(400, f"'{param}': no such image under the allowed directory", param, "invalid_image_url")
    if resolved.stat().st_size > policy.max_image_bytes:
        raise APIError(413, f"'{param}': image is over the {policy.max_image_bytes}-byte limit", param,
                       "image_too_large")
    return resolved.read_bytes()


def read_image_url(url: str, policy: ImagePolicy, param: str = "image_url") -> bytes:
    """The bytes an `image_url` names. Blocking (a fetch may wait up to `fetch_timeout_s`): run it in a thread."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_uri(url, policy, param)
    if scheme in ("http", "https"):
        return _fetch(url, policy, param)
    if scheme in ("file", "") or url.startswith("/"):
        return _local(url, policy, param)
    raise APIError(400, f"'{param}': unsupported URL scheme {scheme!r} (data, http, https)", param,
                   "invalid_image_url")


def prepare_image(data: bytes, policy: ImagePolicy, resolution: int = -1, param: str = "image_url") -> PreparedImage:
    """Decode (header-checked against the pixel cap first), apply `resolution` and Fuyu's 1080x1920 cap, patchify.

    The same steps as the evaluation predictor, so a served answer equals the offline one for the same image."""
    from otterhd_ray.data.images import BadSample, decode_image
    from otterhd_ray.data.processor import patchify, resize_image
    from otterhd_ray.eval.predictor import resize_short_side

    try:
        image = decode_image(data, policy.max_pixels)
    except BadSample as err:
        if err.reason == "image_too_large":
            raise APIError(413, f"'{param}': image is over the {policy.max_pixels}-pixel limit ({err.detail})",
                           param, "image_too_large") from None
        raise APIError(400, f"'{param}': not a usable image ({err})"[:300], param, "invalid_image") from None
    patches_PC, grid = patchify(np.asarray(resize_image(resize_short_side(image, resolution)), dtype=np.uint8))
    # Same bytes at the same resolution -> same patches: hashing the encoded file is 3-4x less data than the
    # patches (1.9 MB vs 6.2 MB for a 1920x1080 JPEG). Only a grouping hint: `prefix_groups` compares the patches.
    digest = hashlib.blake2b(data, digest_size=16, person=str(resolution).encode()[:16]).hexdigest()
    return PreparedImage(patches_PC, (int(grid[0]), int(grid[1])), digest)
