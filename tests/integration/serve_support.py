"""Helpers for the serving tests: a debug model directory, test images, and the offline oracle."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def make_model_dir(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """The debug flavour, random init, saved as an HF directory with the tiny tokenizer beside it."""
    import torch

    from otterhd_ray.data.tokenizer import load_tokenizer
    from otterhd_ray.models.fuyu import FuyuForCausalLM, config_for_tokenizer, flavour_config, save_hf

    torch.manual_seed(seed)
    model = FuyuForCausalLM(config_for_tokenizer(flavour_config("debug"), load_tokenizer(tokenizer_dir)))
    save_hf(model, out)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


def image_bytes(seed: int, size: tuple[int, int] = (96, 64), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user_message(text: str, image: bytes | None = None) -> list[dict]:
    content: list[dict] = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return [{"role": "user", "content": content}]


def offline_answer(model, engine, text: str, image: bytes | None, max_tokens: int) -> tuple[str, int]:
    """The oracle: the model's reference greedy `generate` (share_prefix=False) on the same prompt, decoded the
    way the server decodes (stop ids dropped, leading space of the answer dropped)."""
    import torch

    from otterhd_ray.serve.media import ImagePolicy, prepare_image
    from otterhd_ray.serve.protocol import parse_chat_request

    req = parse_chat_request({"messages": user_message(text, image), "max_tokens": max_tokens})
    prepared = engine.prepare(req, prepare_image(image, ImagePolicy()) if image else None)
    with torch.inference_mode():
        ids = model.generate([(prepared.input_ids_T, prepared.patches_PC)], max_tokens, sorted(engine.stop_ids),
                             share_prefix=False)[0]
    kept = [t for t in ids if t not in engine.stop_ids]
    return engine.decode(kept).lstrip(), len(ids)
