"""The model's input contract, owned here and imported by the data layer (processor, buckets, pipeline).

- Patches: 30x30 RGB pixels flattened as (30, 30, 3) = 2700 values, row-major over the image, uint8 in every
  batch (4x smaller than float32 through Ray's object store); `normalize_patches` turns them into the float32
  values transformers' `FuyuImageProcessor` feeds the model, bit for bit, on whichever device the batch lands.
- `HF_IMAGE_BOX_HW`: the (height, width) box `FuyuImageProcessor` shrinks every image into (`size`).
- `IGNORE_INDEX`: the target id of positions that carry no loss (HF's and `F.cross_entropy`'s convention).

Numpy and torch only: importing this module loads nothing of PIL, transformers, pydantic or yaml.
"""

from __future__ import annotations

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
