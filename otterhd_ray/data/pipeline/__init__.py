"""The training input pipeline: shards -> preprocessed samples -> packed micro-batches, one iterator per rank.

API (called from a Ray Train worker and from plain pytest alike)::

    it = build_train_iterator(cfg.data, tokenizer_dir, rank, world_size, epoch, start_position=0)
    it.num_micro_batches        # the same on every rank, known before the first batch
    for mb in it:               # MicroBatch (docs/internals.md "Packed micro-batch"):
        mb.packed               #   the model's PackedBatch (torch tensors): model.loss(mb.packed.to(device))
        mb.position             #   index of this micro-batch on this rank in this epoch (save position + 1)
        mb.is_filler            #   True: a 3-token batch with zero supervised tokens (keeps ranks in step)
    it.stats                    # PipelineStats of what this iterator yielded; print(format_stats(it.stats))

    epoch_num_micro_batches(cfg.data, tokenizer_dir, world_size, epoch)   # to size LR schedules
    read_rejects(cfg.data.rejects_path, epoch)                            # every reject, one table

How it works, one module per step (each module's docstring says why):

1. `index`: the **length index**, once per shard file and cached: per row the displayed image size from its
   header (no pixel decoding), the number of text tokens and, for a bad row, the reject reason.
2. `schedule`: the **epoch schedule**, cheap, the same on every rank: sample order (`mix.py`), a bucket per
   sample, exact token counts, the whole epoch packed up front, `too_long` rejects, `world_size` equal blocks.
3. `preprocess`: **read + preprocess** a rank's micro-batches in read units (Ray Data tasks, or in-process);
   a row that fails becomes a reject row, never an exception.
4. `iterator`: **assembly and resume**: micro-batches in order, fillers where a rank's block is short or every
   sample of a micro-batch was rejected (so every rank yields the same count); `start_position` resumes exactly.
   `microbatch`: the `MicroBatch` it yields (the model's `PackedBatch` + epoch, position, sample indices and ids).
5. `rejects`: the reject files under `data.rejects_path`, in the one schema of `otterhd_ray.data.rejects`;
   `stats`: `PipelineStats` and its text report. `worker`: the per-process processor cache and Ray checks.

Yielded micro-batches also carry `epoch`, `position`, `sample_index` and `sample_id` (tuple of str). The `source`
of a sample (stats, rejects) is the name of its mix entry. The order depends on (seed, epoch) only: the bucket
choice, the packing and the rank split do not depend on which worker finished first.
"""

from otterhd_ray.data.pipeline.index import index_file, load_index
from otterhd_ray.data.pipeline.iterator import (
    TrainIterator,
    build_train_iterator,
    filler_micro_batch,
    run_pipeline_stats,
)
from otterhd_ray.data.pipeline.microbatch import MicroBatch, collate
from otterhd_ray.data.pipeline.preprocess import RowGroupCache, preprocess_unit, read_units, unit_payload
from otterhd_ray.data.pipeline.rejects import read_rejects
from otterhd_ray.data.pipeline.schedule import EpochSchedule, epoch_num_micro_batches, schedule_epoch
from otterhd_ray.data.pipeline.stats import PipelineStats, format_stats

__all__ = [
    "EpochSchedule",
    "MicroBatch",
    "PipelineStats",
    "RowGroupCache",
    "TrainIterator",
    "build_train_iterator",
    "collate",
    "epoch_num_micro_batches",
    "filler_micro_batch",
    "format_stats",
    "index_file",
    "load_index",
    "preprocess_unit",
    "read_rejects",
    "read_units",
    "run_pipeline_stats",
    "schedule_epoch",
    "unit_payload",
]
