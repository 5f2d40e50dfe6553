"""Resolution buckets and token-budget packing.

**Buckets.** `BucketPolicy.size_for(native_hw, u)` picks the (height, width) an image is resized into:

- ``random``: a seeded choice among ``long_sides`` (plus the native size when ``native`` is on), aspect ratio kept.
  Sides larger than the image's own long side are not offered (enlarging adds tokens, not information); an image
  smaller than every side keeps its native size, or, with ``native`` off, gets the smallest side.
- ``nearest``: the long side closest to the native one, enlarging if that is closer (with ``native`` on that is
  the native size itself, capped — the mode is meant for ``native: false``).
- ``otterhd``: OtterHD's ``--dynamic_resolution``: a random square of ``otterhd_sizes`` (aspect ratio lost). The
  OtterHD code drew one square per batch; we draw one per sample and the packer only puts samples of one bucket
  into a micro-batch, so every micro-batch still has one square size and each sample's size has OtterHD's
  distribution. (The mode was called ``seed``; that still loads, with a warning. ``data.seed`` is the RNG seed.)

Every size is capped to ``native_max_hw`` (HF's 1080×1920 box, aspect kept) and, outside ``otterhd`` mode, rounded
to a multiple of 30: Fuyu cuts 30×30 patches and HF pads the last row/column of patches, so a side of 1024 would pay
for 1050 pixels of which 26 are padding; 1020 is one patch row (or column) fewer and pads nothing. The
aspect ratio moves by at most 15 px per side. ``otterhd`` mode keeps 448/512/768 exactly, as OtterHD did.

Choices are deterministic: the pipeline draws sample i's size from value i of `epoch_uniforms(seed, epoch, n)`,
so a sample's size never depends on which worker processed it or in which order.

**Packing.** `plan_packs(lengths, keys, max_tokens)` groups samples into packed micro-batches with no padding, and
`assemble` concatenates processed samples (docs/internals.md "Processed sample") into one `PackedBatch`.
`StreamingPacker` keeps a bounded buffer per bucket group; once a group holds `lookahead` (default 4) budgets'
worth of tokens, or `buffer_size` samples (the memory cap, applied once at least one budget is buffered), it emits
one micro-batch: the longest buffered sample, then repeatedly the longest one that still fits (greedy
first-fit-decreasing over the window). Waiting for several budgets' worth matters: a buffer holding less than one
budget can only emit an under-filled micro-batch. A sample longer than the budget is rejected with reason
``too_long`` — never truncated. The pipeline packs the bare lengths of a whole epoch up front (it knows every
length exactly before decoding anything).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from otterhd_ray.config import BucketConfig
from otterhd_ray.models.fuyu.inputs import HF_IMAGE_BOX_HW, IGNORE_INDEX, PATCH_DIM, PATCH_SIZE, PackedBatch

TOO_LONG = "too_long"
DEFAULT_BUFFER_SIZE = 256
DEFAULT_LOOKAHEAD = 4.0


# ------------------------------------------------------------------------------------------------ buckets
def epoch_uniforms(seed: int, epoch: int, n: int) -> np.ndarray:
    """The uniform draw of every sample of an epoch at once: value i depends only on (seed, epoch, i) —
    a generator's stream does not depend on how much of it is drawn — and costs nanoseconds per sample."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0xB0C5]).random(n)


def _round30(side: float, cap: int) -> int:
    floor_cap = max(PATCH_SIZE, cap // PATCH_SIZE * PATCH_SIZE)
    return int(min(floor_cap, max(PATCH_SIZE, round(side / PATCH_SIZE) * PATCH_SIZE)))


def num_image_tokens(size_hw: tuple[int, int]) -> int:
    """Tokens an image resized into `size_hw` takes in Fuyu's layout: rows × (cols + one |NEWLINE|)."""
    rows, cols = math.ceil(size_hw[0] / PATCH_SIZE), math.ceil(size_hw[1] / PATCH_SIZE)
    return rows * (cols + 1)


@dataclass(frozen=True)
class BucketPolicy:
    """Chooses the resize target of each image from a `BucketConfig`."""

    cfg: BucketConfig

    def __post_init__(self) -> None:
        if not self.cfg.long_sides and not self.cfg.native and self.cfg.mode != "otterhd":
            raise ValueError("buckets: long_sides is empty and native is off; no size to choose from")
        if self.cfg.mode == "otterhd" and not self.cfg.otterhd_sizes:
            raise ValueError("buckets: mode 'otterhd' needs at least one entry in otterhd_sizes")
        if any(s <= 0 for s in [*self.cfg.long_sides, *self.cfg.otterhd_sizes, *self.cap_hw]):
            raise ValueError("buckets: every size must be positive")

    @property
    def cap_hw(self) -> tuple[int, int]:
        return self.cfg.native_max_hw or HF_IMAGE_BOX_HW

    def _fit(self, native_hw: tuple[int, int], long_side: float) -> tuple[int, int]:
        h, w = native_hw
        cap_h, cap_w = self.cap_hw
        scale = min(long_side / max(h, w), cap_h / h, cap_w / w)
        return _round30(h * scale, cap_h), _round30(w * scale, cap_w)

    def candidates(self, native_hw: tuple[int, int]) -> list[float]:
        """Long sides offered to an image of this native size (before capping and rounding)."""
        native_long = float(max(native_hw))
        sides = [float(s) for s in self.cfg.long_sides if s <= native_long]
        if self.cfg.native:
            sides.append(native_long)
        if not sides:  # tiny image and native off: enlarge to the smallest bucket rather than fail
            sides = [float(min(self.cfg.long_sides))]
        return sides

    def size_for(self, native_hw: tuple[int, int], u: float) -> tuple[int, int]:
        """Target (h, w) given the uniform draw `u` in [0, 1) (ignored by `nearest`)."""
        h, w = int(native_hw[0]), int(native_hw[1])
        if h <= 0 or w <= 0:
            raise ValueError(f"image size must be positive, got {native_hw}")
        if self.cfg.mode == "otterhd":
            sizes = self.cfg.otterhd_sizes
            side = int(sizes[min(len(sizes) - 1, int(u * len(sizes)))])
            return side, side
        if self.cfg.mode == "random":
            sides = self.candidates((h, w))
            return self._fit((h, w), sides[min(len(sides) - 1, int(u * len(sides)))])
        native_long = float(max(h, w))
        sides = [float(s) for s in self.cfg.long_sides] + ([native_long] if self.cfg.native else [])
        return self._fit((h, w), min(sides, key=lambda s: (abs(s - native_long), s)))

    def group_key(self, size_hw: tuple[int, int]) -> Hashable:
        """Samples sharing a key may share a micro-batch. Only `otterhd` mode needs one size per micro-batch;
        elsewhere packed varlen attention mixes sizes freely and grouping would only fragment the buffer."""
        return tuple(size_hw) if self.cfg.mode == "otterhd" else None


# ------------------------------------------------------------------------------------------------ packing
@dataclass
class _Group:
    lengths: list[int] = field(default_factory=list)  # sorted ascending
    items: list[Any] = field(default_factory=list)  # aligned with `lengths`
    tokens: int = 0


class StreamingPacker:
    """Bounded-buffer packer over (key, length, item) triples; emits lists of items whose lengths sum to
    at most `max_tokens` (and at most `max_samples` items when it is > 0).

    A group emits a micro-batch once it buffers `lookahead` budgets' worth of tokens (enough choice to fill
    one well) or `buffer_size` items (the memory bound), whichever comes first; a buffer of fewer tokens than
    one budget could only produce an under-filled micro-batch. Items longer than `max_tokens` are not packed:
    they land in `self.rejected` (reason `too_long`). Deterministic: the output depends only on the input order.
    """

    def __init__(
        self,
        max_tokens: int,
        max_samples: int = 0,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        lookahead: float = DEFAULT_LOOKAHEAD,
    ) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if max_samples < 0 or buffer_size < 1 or lookahead < 1:
            raise ValueError("max_samples must be >= 0, buffer_size >= 1 and lookahead >= 1")
        self.max_tokens = max_tokens
        self.max_samples = max_samples
        self.buffer_size = buffer_size
        self.lookahead_tokens = lookahead * max_tokens
        self.rejected: list[Any] = []
        self._groups: dict[Hashable, _Group] = {}

    def add(self, key: Hashable, length: int, item: Any) -> list[list[Any]]:
        if length > self.max_tokens:
            self.rejected.append(item)
            return []
        if length <= 0:
            raise ValueError(f"cannot pack an empty sample (length {length})")
        group = self._groups.setdefault(key, _Group())
        # Sorted insert (ties after equals) keeps the buffer ordered for the greedy pick; deterministic.
        pos = bisect.bisect_right(group.lengths, length)
        group.lengths.insert(pos, length)
        group.items.insert(pos, item)
        group.tokens += length
        out = []
        # The count cap only applies once a full budget is buffered: below that, an emitted micro-batch would be
        # under-filled by construction, and memory is bounded by one budget of tokens anyway.
        while group.tokens >= self.lookahead_tokens or (
            len(group.lengths) >= self.buffer_size and group.tokens >= self.max_tokens
        ):
            out.append(self._emit(group))
        return out

    def flush(self) -> list[list[Any]]:
        out = []
        for key in list(self._groups):
            group = self._groups.pop(key)
            while group.lengths:
                out.append(self._emit(group))
        return out

    def _emit(self, group: _Group) -> list[Any]:
        budget = self.max_tokens
        chosen: list[int] = []
        i = len(group.lengths) - 1
        while i >= 0 and (self.max_samples == 0 or len(chosen) < self.max_samples):
            if group.lengths[i] <= budget:
                chosen.append(i)
                budget -= group.lengths[i]
                if budget < group.lengths[0]:
                    break
                # jump to the longest item that can still fit
                i = min(i - 1, bisect.bisect_right(group.lengths, budget) - 1)
            else:
                i = bisect.bisect_right(group.lengths, budget, 0, i) - 1
        items = [group.items[j] for j in chosen]
        for j in sorted(chosen, reverse=True):
            group.tokens -= group.lengths[j]
            del group.lengths[j]
            del group.items[j]
        return items


def plan_packs(
    lengths: Iterable[int],
    keys: Iterable[Hashable] | None,
    max_tokens: int,
    max_samples: int = 0,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
) -> tuple[list[list[int]], list[int]]:
    """Pack positions 0..n-1 by length. Returns (micro-batches as lists of positions, too-long positions)."""
    packer = StreamingPacker(max_tokens, max_samples, buffer_size)
    bins: list[list[int]] = []
    lengths = list(lengths)
    keys_list = list(keys) if keys is not None else [None] * len(lengths)
    if len(keys_list) != len(lengths):
        raise ValueError("plan_packs: keys and lengths differ in length")
    for pos, (key, length) in enumerate(zip(keys_list, lengths, strict=True)):
        bins.extend(packer.add(key, int(length), pos))
    bins.extend(packer.flush())
    # Within a micro-batch keep epoch order; it makes dumps readable and costs nothing.
    return [sorted(b) for b in bins], list(packer.rejected)


def packing_efficiency(num_real_tokens: int, num_micro_batches: int, max_tokens: int) -> float:
    """Real tokens over the token budget the micro-batches could have held."""
    return num_real_tokens / (num_micro_batches * max_tokens) if num_micro_batches else 0.0


# ----------------------------------------------------------------------------------------- micro-batches
def assemble(samples: list[dict[str, Any]]) -> PackedBatch:
    """Concatenate processed samples (numpy rows) into one packed micro-batch (docs/internals.md).

    This is where the pipeline's numpy turns into the model's torch tensors: the rows are concatenated in numpy,
    then wrapped with `torch.from_numpy` (no copy). Rows stay numpy up to here because Ray Data moves numpy."""
    if not samples:
        raise ValueError("assemble: no samples")
    ids, targets, positions, patches, cu = [], [], [], [], [0]
    for s in samples:
        input_ids = np.asarray(s["input_ids"], dtype=np.int64)
        labels = np.asarray(s["labels"], dtype=np.int64)
        if input_ids.shape != labels.shape or input_ids.ndim != 1 or len(input_ids) == 0:
            raise ValueError(f"sample {s.get('id')!r}: input_ids and labels must be equal, non-empty 1-D arrays")
        target = np.full_like(labels, IGNORE_INDEX)
        target[:-1] = labels[1:]  # predict token t+1 at t; the last token predicts nothing across samples
        ids.append(input_ids)
        targets.append(target)
        positions.append(np.arange(len(input_ids), dtype=np.int64))
        patches.append(np.asarray(s["patches"], dtype=np.uint8).reshape(-1, PATCH_DIM))
        cu.append(cu[-1] + len(input_ids))
    target_ids = np.concatenate(targets)
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(ids)),
        target_ids=torch.from_numpy(target_ids),
        position_ids=torch.from_numpy(np.concatenate(positions)),
        cu_seqlens=torch.from_numpy(np.asarray(cu, dtype=np.int32)),
        max_seqlen=int(np.diff(cu).max()),
        patches=torch.from_numpy(np.ascontiguousarray(np.concatenate(patches, axis=0))),
        num_target_tokens=int((target_ids != IGNORE_INDEX).sum()),
    )
