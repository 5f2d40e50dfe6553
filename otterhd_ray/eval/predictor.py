"""Predictor actor: a Ray Data stateful callable that answers every question of each benchmark item.

The model is loaded once, in `__init__`, from an HF directory (ours or adept/fuyu-8b's layout) through
`otterhd_ray.models.fuyu.hf.load_hf`; one `__call__` takes a batch of items and runs one batched greedy
KV-cache decode over every prompt of the batch (MagnifierBench asks two questions per item, the other
benchmarks one), so the generations of an item share the batch instead of running one after the other as the
seed does. The prompts of an item are adjacent and carry the same patches tensor, so the model's shared-prefix
decoding (`share_prefix`) prefills the image (+ `<s>` and any common text) once per item and keeps its K/V once.

Input columns:  id (str), image (encoded bytes), texts (a JSON list of prompts already in the model's
                convention) - or the older pair mc_text, ff_text.
Output columns: id, responses (JSON list, one per prompt; mc_response, ff_response for the older pair),
                num_prompt_tokens, num_new_tokens, generate_s, error ("" when fine).
An item whose image cannot be decoded gets `error` set and empty responses; it never fails the batch.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

# Decompression-bomb limit for benchmark images (PIL's default).
MAX_IMAGE_PIXELS = 89_478_485


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    """The seed's `resolution`: scale so the short side is `resolution` (aspect kept); -1 leaves it as is."""
    if resolution == -1:
        return image
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image if size == (w, h) else image.resize(size, Image.Resampling.BILINEAR)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is visible to this actor")
    return device


def pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


class Predictor:
    """`ds.map_batches(Predictor, fn_constructor_kwargs=..., compute=ActorPoolStrategy(size=N), num_gpus=g)`."""

    def __init__(
        self,
        model_path: str,
        resolution: int = -1,
        max_new_tokens: int = 64,
        device: str = "auto",
        dtype: str = "auto",
        preprocess_threads: int = 4,
        share_prefix: bool = True,
        adapter_path: str | None = None,
    ) -> None:
        from otterhd_ray.data.tokenizer import load_tokenizer
        from otterhd_ray.models.fuyu.hf import load_hf

        device = pick_device(device)
        model = load_hf(model_path, dtype=pick_dtype(dtype, device), device=device)
        if adapter_path:
            from otterhd_ray.models.fuyu.lora import remove_lora  # noqa: PLC0415
            from otterhd_ray.models.fuyu.peft import load_peft_adapter  # noqa: PLC0415

            load_peft_adapter(model, adapter_path)
            remove_lora(model, merge_first=True)  # merged once: decoding costs what the base costs
        self._setup(
            model,
            load_tokenizer(model_path),
            resolution,
            max_new_tokens,
            None,
            preprocess_threads,
            share_prefix,
        )

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        resolution: int = -1,
        max_new_tokens: int = 64,
        stop_ids: list[int] | None = None,
        preprocess_threads: int = 4,
        share_prefix: bool = True,
    ) -> Predictor:
        """An in-memory model (benchmarks, tests); `stop_ids=[]` forces exactly `max_new_tokens` per answer.

        `share_prefix=False` decodes every prompt on its own (the reference path; benchmarks compare both)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, resolution, max_new_tokens, stop_ids, preprocess_threads, share_prefix)
        return self

    def _setup(
        self,
        model: Any,
        tokenizer: Any,
        resolution: int,
        max_new_tokens: int,
        stop_ids: Any,
        preprocess_threads: int,
        share_prefix: bool = True,
    ) -> None:
        from otterhd_ray.data.processor import FuyuProcessor
        from otterhd_ray.data.tokenizer import fuyu_tokens

        self.resolution = resolution
        self.max_new_tokens = max_new_tokens
        self.share_prefix = share_prefix
        self.tokenizer = tokenizer
        self.processor = FuyuProcessor(tokenizer)
        if stop_ids is None:
            # The answer ends at |ENDOFTEXT| (what training appends) or the tokenizer's eos.
            stop_ids = [fuyu_tokens(tokenizer).end]
            if tokenizer.eos_token_id is not None:
                stop_ids.append(int(tokenizer.eos_token_id))
        self.stop_ids = sorted(set(stop_ids))
        self.model = model.eval()
        self._pool = ThreadPoolExecutor(max_workers=max(1, preprocess_threads), thread_name_prefix="prep")

    def _prepare_image(self, data: bytes) -> tuple[Any, tuple[int, int]] | str:
        """Decode, apply `resolution`, the processor's cap (HF's image box), then patchify: (patches, grid).

        Runs in a thread pool (Pillow and numpy release the GIL), so a batch's images are prepared in parallel,
        and once per item: both questions share the patches. Returns the error text for an unusable image.
        """
        import torch

        from otterhd_ray.data.images import decode_image
        from otterhd_ray.data.processor import patchify, resize_image

        try:
            image = resize_image(resize_short_side(decode_image(data, MAX_IMAGE_PIXELS), self.resolution))
        except ValueError as err:  # BadSample is a ValueError: an unreadable image fails its item only
            return f"{type(err).__name__}: {err}"[:300]
        patches_PC, grid = patchify(np.asarray(image, dtype=np.uint8))
        return torch.from_numpy(patches_PC), grid

    def _prompt_ids(self, grid: tuple[int, int], text: str) -> Any:
        """The processor's layout for (image of `grid`, text): image tokens + `<s>` + tokenized text + `<0x04>`.

        The text part comes from the processor itself (`encode_text`); tokenizing stays on this thread (HF fast
        tokenizers are not safe to call from several threads). tests/unit/test_eval_predictor.py checks equality
        with encode_prompt.
        """
        import torch

        from otterhd_ray.data.processor import image_token_ids

        ids = image_token_ids(grid, self.processor.tokens) + self.processor.encode_text(text)
        return torch.as_tensor(ids, dtype=torch.long)

    @staticmethod
    def _texts(batch: dict[str, np.ndarray]) -> tuple[list[list[str]], bool]:
        """Each item's prompts, and whether the batch uses the older mc_text / ff_text columns."""
        if "texts" in batch:
            return [[str(t) for t in json.loads(str(x))] for x in batch["texts"]], False
        pairs = zip(batch["mc_text"], batch["ff_text"], strict=True)
        return [[str(mc), str(ff)] for mc, ff in pairs], True

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(x) for x in batch["id"]]
        n = len(ids)
        texts, legacy = self._texts(batch)
        answers: list[list[str]] = [[""] * len(t) for t in texts]
        errors = [""] * n
        num_prompt, num_new = np.zeros(n, np.int64), np.zeros(n, np.int64)
        prompts: list[tuple[Any, Any]] = []
        owners: list[tuple[int, int]] = []  # (item index, question index) of each prompt
        prepared = list(self._pool.map(self._prepare_image, [bytes(b) for b in batch["image"]]))
        for i, prep in enumerate(prepared):
            if isinstance(prep, str):
                errors[i] = prep
                continue
            patches, grid = prep
            try:
                item_ids = [self._prompt_ids(grid, text) for text in texts[i]]
            except ValueError as err:  # e.g. reserved tokens in the text: this item only
                errors[i] = f"{type(err).__name__}: {err}"[:300]
                continue
            for q, prompt_ids in enumerate(item_ids):
                prompts.append((prompt_ids, patches))
                owners.append((i, q))
                num_prompt[i] += int(prompt_ids.numel())
        import torch

        start = time.perf_counter()
        with torch.inference_mode():
            generated = (
                self.model.generate(
                    prompts, self.max_new_tokens, self.stop_ids, share_prefix=self.share_prefix
                )
                if prompts
                else []
            )
        seconds = time.perf_counter() - start
        for (i, q), new_ids in zip(owners, generated, strict=True):
            new_ids = [t for t in new_ids if t not in self.stop_ids]
            answers[i][q] = self.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
            num_new[i] += len(new_ids)
        out = {
            "id": np.asarray(ids, dtype=object),
            "responses": np.asarray([json.dumps(a) for a in answers], dtype=object),
            "num_prompt_tokens": num_prompt,
            "num_new_tokens": num_new,
            "generate_s": np.full(n, seconds / max(n, 1)),
            "error": np.asarray(errors, dtype=object),
        }
        if legacy:
            out["mc_response"] = np.asarray([a[0] for a in answers], dtype=object)
            out["ff_response"] = np.asarray([a[1] for a in answers], dtype=object)
        return out
