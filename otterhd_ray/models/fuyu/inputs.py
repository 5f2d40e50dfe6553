"""The model's input contract, owned here and imported by the data layer (processor, buckets, pipeline).

- Patches: 30x30 RGB pixels flattened as (30, 30, 3) = 2700 values, row-major over the image, uint8 in every
  batch (4x smaller than float32 through Ray's object store); `normalize_patches` turns them into the float32
  values transformers' `FuyuImageProcessor` feeds the model, bit for bit, on whichever device the batch lands.
- `HF_IMAGE_BOX_HW`: the (height, width) box `FuyuImageProcessor` shrinks every image into (`size`).
- `IGNORE_INDEX`: the target id of positions that carry no loss (HF's and `F.cross_entropy`'s convention).
- `PackedBatch`: the packed micro-batch the model's forward and loss take (docs/internals.md "Packed
  micro-batch"); the data layer builds it and wraps it with its own bookkeeping (`data.pipeline.MicroBatch`).

Numpy and torch only: importing this module loads nothing of PIL, transformers, pydantic or yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PATCH_SIZE = 30
NUM_CHANNELS = 3
PATCH_DIM = PATCH_SIZE * PATCH_SIZE * NUM_CHANNELS  # 2700 raw values per 30x30 RGB patch
HF_IMAGE_BOX_HW = (1080, 1920)  # FuyuImageProcessor.size: images are shrunk (never enlarged) to fit
IGNORE_INDEX = -100

# HF: float32(float64(x) * (1/255)), then (x - float32(0.5)) / float32(0.5) in float32. A 256-entry table of exactly
# those values makes normalisation a gather, bit-identical by construction.
_RESCALED = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
NORMALIZE_LUT = (_RESCALED - np.float32(0.5)) / np.float32(0.5)
_TORCH_LUTS: dict[torch.device, torch.Tensor] = {}


def normalize_patches(x: Any) -> Any:
    """uint8 patches (numpy or torch, any shape) -> float32 `(x/255 - 0.5)/0.5`, bit-identical to HF's values."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise ValueError(f"normalize_patches expects uint8 pixels, got {x.dtype}")
        return NORMALIZE_LUT[x]
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"normalize_patches expects a numpy array or torch tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise ValueError(f"normalize_patches expects uint8 pixels, got {x.dtype}")
    lut = _TORCH_LUTS.get(x.device)
    if lut is None:
        lut = _TORCH_LUTS[x.device] = torch.from_numpy(NORMALIZE_LUT).to(x.device)
    # index with int32, never with the uint8 tensor itself (torch would read that as a boolean mask)
    return lut[x.to(torch.int32)]


@dataclass(frozen=True)
class PackedBatch:
    """One packed micro-batch as the model consumes it: samples concatenated without padding (torch tensors).

    Legend: T tokens of the row, S samples, P image patches. Only what the forward and the loss read is here;
    where the samples came from (epoch, position, sample ids) is the data layer's `MicroBatch`. Frozen: derive a
    changed batch with `dataclasses.replace`. Plain tensors and ints, so it pickles as it is.
    """

    input_ids: torch.Tensor  # int64 [T]: samples concatenated, no padding
    target_ids: torch.Tensor  # int64 [T]: labels[t+1] within a sample, IGNORE_INDEX elsewhere
    position_ids: torch.Tensor  # int64 [T]: restart at 0 for every sample (rotary positions)
    cu_seqlens: torch.Tensor  # int32 [S+1]: sample bounds, cu_seqlens[0] = 0, cu_seqlens[-1] = T
    max_seqlen: int  # longest sample
    patches: torch.Tensor  # uint8 [P, 2700]: every sample's patches, in |SPEAKER| order
    # Supervised positions (target_ids != IGNORE_INDEX), counted by the packer on the host; None makes the loss
    # count them itself, at the cost of a device->host sync.
    num_target_tokens: int | None = None

    def __post_init__(self) -> None:
        # Shapes only (no device read): a mismatch here would otherwise surface as an index error deep in a layer.
        if self.input_ids.dim() != 1:
            raise ValueError(f"PackedBatch.input_ids must be a packed 1-D row [T], got {tuple(self.input_ids.shape)}")
        for name in ("target_ids", "position_ids"):
            shape = tuple(getattr(self, name).shape)
            if shape != tuple(self.input_ids.shape):
                raise ValueError(f"PackedBatch.{name} must have input_ids' shape {tuple(self.input_ids.shape)}, "
                                 f"got {shape}")
        if self.cu_seqlens.dim() != 1 or self.cu_seqlens.shape[0] < 2:
            raise ValueError(f"PackedBatch.cu_seqlens must be 1-D [S+1] with S >= 1, got {tuple(self.cu_seqlens.shape)}")
        if self.patches.dim() != 2:
            raise ValueError(f"PackedBatch.patches must be [P, {PATCH_DIM}], got {tuple(self.patches.shape)}")

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_samples(self) -> int:
        """Packed sequences (a filler row counts as one)."""
        return int(self.cu_seqlens.shape[0]) - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """The same batch with every tensor on `device` (non_blocking: async from pinned host memory)."""
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{
            name: t.to(device, non_blocking=non_blocking) for name, t in tensors.items() if isinstance(t, torch.Tensor)
        })
