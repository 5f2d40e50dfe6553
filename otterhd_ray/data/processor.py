"""Image -> 30x30 patches and prompt -> token ids, in transformers' Fuyu layout (numpy; torch optional).

Shapes (docs/internals.md): `P` patches, `C` = 2700 values per patch (30*30*3), `T` tokens.

Image path, matching transformers 5.17 `FuyuImageProcessor` (PIL backend) step for step:
1. RGB (`convert("RGB")`, as `load_image` does);
2. resize with PIL bilinear: `size=None` shrinks (never enlarges) to fit 1080x1920 keeping aspect, with HF's own
   `int(side * scale)` rounding; `size=(h, w)` resizes to exactly (h, w) (the bucket policy chose it);
3. pad bottom/right with pixel value 1 -- HF pads the *uint8* image with `padding_value=1.0` *before* rescaling,
   so the pad is the integer pixel 1 (normalised: (1/255 - 0.5)/0.5 = -0.99216), not white;
4. emit only the patches covering the unpadded area rounded up to 30, row-major, each flattened as (30, 30, 3).
Patches stay uint8 (4x smaller than float32 through Ray's object store); `normalize_patches` gives HF's float32
values bit for bit on whichever device the batch lands. The patch size, HF's image box, the ignore index and
`normalize_patches` belong to the model (`otterhd_ray.models.fuyu.inputs`); this module imports them.

Token layout of one image + prompt (HF `FuyuProcessor`): `[|SPEAKER| x cols, |NEWLINE|] x rows`, `<s>`, then
`tokenizer(prompt + "<0x04>")` without special tokens. Training: the image once, then per turn
`tokenizer(template(instruction) + "<0x04>")`, `tokenizer(" " + answer)`, end token id. Each segment is tokenized
on its own (a Metaspace tokenizer starts each with `▁`, as HF's prompt after `<s>` does), which keeps the label
boundaries exact where tokenizing the whole seed string at once could merge pieces across a boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from otterhd_ray.config import SEED_TRAIN_TEMPLATE
from otterhd_ray.data.conversation import validate_conversation
from otterhd_ray.data.images import BadSample
from otterhd_ray.data.tokenizer import BOA_TOKEN, FuyuTokens, fuyu_tokens
from otterhd_ray.models.fuyu.inputs import HF_IMAGE_BOX_HW, IGNORE_INDEX, PATCH_DIM, PATCH_SIZE

PAD_PIXEL = 1  # HF's padding_value=1.0 applied to the uint8 image (see module doc)


def hf_resized_size(height: int, width: int, max_hw: tuple[int, int] = HF_IMAGE_BOX_HW) -> tuple[int, int]:
    """(h, w) FuyuImageProcessor resizes a (height, width) image to: shrink to fit `max_hw`, never enlarge."""
    max_h, max_w = max_hw
    if width <= max_w and height <= max_h:
        return height, width
    scale = min(max_h / height, max_w / width)
    # same float expression as HF; max(1, ...) only matters for absurd aspect ratios HF would crash on
    return max(1, int(height * scale)), max(1, int(width * scale))


def patch_grid(height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of patches emitted for a resized image of (height, width)."""
    return math.ceil(height / PATCH_SIZE), math.ceil(width / PATCH_SIZE)


def resize_image(image: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
    """RGB + the resize of `image_to_patches` (HF's when `size` is None, exactly `size` = (h, w) otherwise)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if size is None:
        new_h, new_w = hf_resized_size(height, width)
    else:
        new_h, new_w = int(size[0]), int(size[1])
        if new_h <= 0 or new_w <= 0:
            raise ValueError(f"target size must be positive, got {size}")
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    return image


def patchify(pixels_HW3: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [H, W, 3] -> (patches uint8 [P, 2700], (rows, cols)), padding bottom/right with `PAD_PIXEL`."""
    if pixels_HW3.dtype != np.uint8 or pixels_HW3.ndim != 3 or pixels_HW3.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] pixels, got {pixels_HW3.dtype} {pixels_HW3.shape}")
    height, width = pixels_HW3.shape[:2]
    rows, cols = patch_grid(height, width)
    if (rows * PATCH_SIZE, cols * PATCH_SIZE) != (height, width):
        padded = np.full((rows * PATCH_SIZE, cols * PATCH_SIZE, 3), PAD_PIXEL, dtype=np.uint8)
        padded[:height, :width] = pixels_HW3
        pixels_HW3 = padded
    patches_PC = (
        pixels_HW3.reshape(rows, PATCH_SIZE, cols, PATCH_SIZE, 3)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * cols, PATCH_DIM)
    )
    # Own, writable, contiguous memory: a reshape of PIL's read-only buffer can otherwise come back as a view.
    return np.require(patches_PC, requirements=("C", "W", "O")), (rows, cols)


def image_to_patches(
    image: Image.Image, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Image -> (patches uint8 [P, 2700], (rows, cols)). `size=None`: HF's resize; `(h, w)`: resize to exactly that."""
    resized = resize_image(image, size)
    return patchify(np.asarray(resized, dtype=np.uint8))


def image_token_ids(grid: tuple[int, int], tokens: FuyuTokens) -> list[int]:
    """`[|SPEAKER| x cols, |NEWLINE|] x rows` followed by `<s>`."""
    rows, cols = grid
    return ([tokens.image] * cols + [tokens.newline]) * rows + [tokens.bos]


class FuyuProcessor:
    """Ours: image + prompt / conversation -> a processed sample (docs/internals.md), HF's layout."""

    def __init__(self, tokenizer: Any, instruction_template: str = SEED_TRAIN_TEMPLATE) -> None:
        if "{instruction}" not in instruction_template:
            raise ValueError(
                f"instruction_template must contain '{{instruction}}', got {instruction_template!r}"
            )
        self.tokenizer = tokenizer
        self.instruction_template = instruction_template
        self.tokens = fuyu_tokens(tokenizer)
        # Ids text must not produce: image placeholders break the |SPEAKER| count == patch count invariant (the
        # model fails on the sample); in training text a boa or end token (e.g. a raw "\x04" char, which byte
        # fallback maps to <0x04>) would fake a turn boundary or an early stop in the supervision.
        self._reserved = frozenset({self.tokens.image, self.tokens.newline})
        self._reserved_training = self._reserved | {self.tokens.boa, self.tokens.end}
        # Fail at construction, not on every sample, when "<0x04>" is not one token for this tokenizer or the
        # template itself holds a reserved token (e.g. the seed's raw "\x04": the processor adds "<0x04>" itself).
        try:
            self._encode_prompt_text(
                self.instruction_template.replace("{instruction}", "probe"), training=True
            )
        except BadSample as err:
            raise ValueError(f"instruction_template {instruction_template!r} is unusable: {err}") from None

    # --------------------------------------------------------------------------------------------- text
    def _check_reserved(self, ids: list[int], reserved: frozenset[int]) -> None:
        found = reserved.intersection(ids)
        if found:
            names = self.tokenizer.convert_ids_to_tokens(sorted(found))
            raise BadSample("reserved_token_in_text", f"text encodes to reserved token(s) {names}")

    def _tokenize(self, text: str, reserved: frozenset[int]) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        self._check_reserved(ids, reserved)
        return ids

    def _encode_prompt_text(self, prompt: str, training: bool = False) -> list[int]:
        # HF tokenizes the prompt together with "<0x04>" (not the id appended), so do the same.
        ids = self._tokenize(prompt + BOA_TOKEN, self._reserved)
        if training:
            self._check_reserved(ids[:-1], self._reserved_training)
        if not ids or ids[-1] != self.tokens.boa:
            raise ValueError(
                f"tokenizer does not encode {BOA_TOKEN!r} at the end of a prompt as its boa token "
                f"(id {self.tokens.boa}); got {ids[-3:]}"
            )
        return ids

    # -------------------------------------------------------------------------------------------- image
    def _image_part(self, image: Image.Image, size: tuple[int, int] | None) -> tuple[np.ndarray, ...]:
        resized = resize_image(image, size)
        patches_PC, grid = patchify(np.asarray(resized, dtype=np.uint8))
        bucket = np.array([resized.size[1], resized.size[0]], dtype=np.int32)
        return patches_PC, np.array(grid, dtype=np.int32), bucket

    @staticmethod
    def _sample(ids: list[int], labels: list[int], patches_PC, grid, bucket) -> dict[str, Any]:
        return {
            "input_ids": np.asarray(ids, dtype=np.int32),
            "labels": np.asarray(labels, dtype=np.int32),
            "patches": patches_PC,
            "grid": grid,
            "bucket": bucket,
            "num_tokens": np.int32(len(ids)),
        }

    # ---------------------------------------------------------------------------------------------- api
    def encode_text(self, text: str) -> list[int]:
        """The ids of an eval prompt's text as `encode_prompt` lays them after the image block and `<s>`:
        `tokenizer(text + "<0x04>")`. For callers that build the image block themselves (the eval predictor)."""
        if not isinstance(text, str):
            raise BadSample("missing_text", f"prompt must be a string, got {type(text).__name__}")
        return self._encode_prompt_text(text)

    def encode_turns(self, conversations: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """(ids, labels) of a training conversation's turns as `encode_conversation` lays them after the image
        block and `<s>`: per turn `template(instruction) <0x04>` (unsupervised), ` {answer}` end (supervised)."""
        ids: list[int] = []
        labels: list[int] = []
        for instruction, answer in validate_conversation(conversations):
            prompt_ids = self._encode_prompt_text(
                self.instruction_template.replace("{instruction}", instruction), training=True
            )
            # " {answer}": the seed's space after <0x04>; a Metaspace tokenizer encodes it as the word-start mark.
            answer_ids = self._tokenize(" " + answer, self._reserved_training) + [self.tokens.end]
            ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        return ids, labels

    def num_text_tokens(self, conversations: Sequence[dict[str, Any]]) -> int:
        """Tokens a training conversation adds to its image's rows: `<s>` and every turn (no image work)."""
        return 1 + len(self.encode_turns(conversations)[0])

    def encode_prompt(
        self, image: Image.Image, text: str, size: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """Eval: exactly transformers' `FuyuProcessor(images=image, text=text)` layout; labels all -100."""
        text_ids = self.encode_text(text)
        patches_PC, grid, bucket = self._image_part(image, size)
        ids = image_token_ids((int(grid[0]), int(grid[1])), self.tokens) + text_ids
        return self._sample(ids, [IGNORE_INDEX] * len(ids), patches_PC, grid, bucket)

    def encode_conversation(
        self,
        image: Image.Image | None,
        conversations: Sequence[dict[str, Any]],
        size: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """Training: image once, then per turn `template(instruction) <0x04>` ` {answer}` end; labels on answers + end.

        `image=None`: a text-only sample (no patches; the token layout starts at `<s>`).

        `conversations` alternates `{"role": "user", "text": ...}` and `{"role": "assistant", "text": ...}`,
        starting with the user and ending with the assistant. Anything else raises `BadSample`.
        """
        turn_ids, turn_labels = self.encode_turns(conversations)
        if image is None:  # text-only sample: no image rows, `<s>` then the turns (HF's text-only layout)
            patches_PC = np.zeros((0, PATCH_DIM), np.uint8)
            grid, bucket = np.zeros(2, np.int32), np.zeros(2, np.int32)
        else:
            patches_PC, grid, bucket = self._image_part(image, size)
        ids = image_token_ids((int(grid[0]), int(grid[1])), self.tokens)
        labels = [IGNORE_INDEX] * len(ids) + turn_labels
        return self._sample(ids + turn_ids, labels, patches_PC, grid, bucket)
