"""`MicroBatch`: what a rank's training iterator yields — the model's `PackedBatch` plus where its samples came from;
`collate` builds one from processed samples.

Composition, not a subclass of `PackedBatch`: the loop hands `mb.packed` to the engine, so the model, DDP's and
DeepSpeed's input hooks and the host->device copy see exactly the tensors the loss reads, while the bookkeeping
(sample indices and ids for resume and the exactly-once audit) stays on the host and never reaches the model's
signature. Frozen and made of tensors, ints and strings, so it pickles as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from otterhd_ray.data.buckets import assemble
from otterhd_ray.models.fuyu.inputs import PackedBatch


@dataclass(frozen=True)
class MicroBatch:
    """One packed micro-batch of one rank's epoch (docs/internals.md "Packed micro-batch")."""

    packed: PackedBatch  # the model's input (torch tensors, on the host until the loop moves it)
    sample_index: torch.Tensor  # int64 [S]: each sample's global index in the epoch order; empty for a filler
    sample_id: tuple[str, ...]  # the samples' ids (repeats carry `#r<k>`), in `sample_index` order
    epoch: int  # the epoch this micro-batch belongs to
    position: int  # index of this micro-batch on this rank in this epoch (resume: save position + 1)

    def __post_init__(self) -> None:
        if self.sample_index.dim() != 1 or len(self.sample_id) != self.sample_index.shape[0]:
            raise ValueError(f"MicroBatch: {len(self.sample_id)} sample ids for sample_index of shape "
                             f"{tuple(self.sample_index.shape)}")

    @property
    def num_samples(self) -> int:
        """Real samples (0 for a filler; the packed row of a filler still holds one 3-token sequence)."""
        return len(self.sample_id)

    @property
    def is_filler(self) -> bool:
        """A micro-batch with no sample: it completes a short rank's block (or replaces one whose every sample
        was rejected) so every rank runs the same number of steps; no supervised token."""
        return not self.sample_id


def collate(samples: list[dict[str, Any]], epoch: int, position: int) -> MicroBatch:
    """Processed samples (numpy rows with `id` and `sample_index`) -> the `MicroBatch` at `position` of `epoch`;
    `buckets.assemble` packs the tensors."""
    sample_index = torch.tensor([int(s["sample_index"]) for s in samples], dtype=torch.int64)
    return MicroBatch(assemble(samples), sample_index, tuple(str(s["id"]) for s in samples), epoch, position)
