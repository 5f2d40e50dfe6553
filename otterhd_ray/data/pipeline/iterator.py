"""One rank's packed micro-batches of one epoch, in order, with fillers and rejects accounted for.

Rows come back from preprocessing (Ray Data or in-process) and are gathered per micro-batch; a micro-batch is
emitted once all its rows are in, strictly in order. A rejected row is left out of its micro-batch, which becomes
a filler if nothing is left, so the count never changes; a short rank block is completed with fillers.

Resume: `position` = number of micro-batches this rank consumed in `epoch` (equal on all ranks at a step
boundary). `start_position=p` skips micro-batches < p without reading them, except those sharing a read unit
with p: they are decoded again, not yielded, so that unit's rejects file is rewritten whole. Nothing is skipped
or repeated, and the stats count only what this iterator yielded.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otterhd_ray.config import DataConfig, FinetuneConfig
from otterhd_ray.data.pipeline.microbatch import MicroBatch, collate
from otterhd_ray.data.pipeline.preprocess import (
    ReadUnit,
    RowGroupCache,
    iter_rows_local,
    iter_rows_ray,
    read_units,
    unit_payload,
)
from otterhd_ray.data.pipeline.rejects import PLAN_REJECTS_FILE, unit_rejects_file, write_rejects
from otterhd_ray.data.pipeline.schedule import EpochSchedule, schedule_epoch
from otterhd_ray.data.pipeline.stats import PipelineStats, format_stats
from otterhd_ray.data.pipeline.worker import ray_has_spare_cpu
from otterhd_ray.data.rejects import reject_row
from otterhd_ray.models.fuyu.inputs import IGNORE_INDEX, PATCH_DIM, PackedBatch


def filler_micro_batch(tokenizer_dir: str | Path) -> PackedBatch:
    """A 3-token micro-batch (one image patch, |NEWLINE|, <s>) with no supervised token: it runs the same
    forward/backward (every parameter touched, so DDP/ZeRO collectives match) and adds nothing to the loss."""
    from otterhd_ray.data.tokenizer import fuyu_tokens, load_tokenizer

    tok = fuyu_tokens(load_tokenizer(tokenizer_dir))
    return PackedBatch(
        input_ids=torch.tensor([tok.image, tok.newline, tok.bos], dtype=torch.int64),
        target_ids=torch.full((3,), IGNORE_INDEX, dtype=torch.int64),
        position_ids=torch.arange(3, dtype=torch.int64),
        cu_seqlens=torch.tensor([0, 3], dtype=torch.int32),
        max_seqlen=3,
        patches=torch.zeros((1, PATCH_DIM), dtype=torch.uint8),
        num_target_tokens=0,
    )


def _row_to_sample(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "sample_index": int(row["sample_index"]),
        "input_ids": np.frombuffer(row["input_ids"], np.int32),
        "labels": np.frombuffer(row["labels"], np.int32),
        "patches": np.frombuffer(row["patches"], np.uint8).reshape(-1, PATCH_DIM),
        "num_tokens": int(row["num_tokens"]),
    }


class TrainIterator:
    """One rank's micro-batches for one epoch (see `otterhd_ray.data.pipeline`). Iterate once.

    In-process preprocessing reads through `row_group_cache`, owned by this iterator; Ray Data tasks use their
    worker process's cache."""

    def __init__(self, cfg: DataConfig, tokenizer_dir: str | Path, rank: int, world_size: int, epoch: int,
                 start_position: int = 0, use_ray: bool | None = None,
                 schedule: EpochSchedule | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg = cfg
        self.tokenizer_dir = str(tokenizer_dir)
        self.rank, self.world_size, self.epoch = rank, world_size, int(epoch)
        self.schedule = schedule or schedule_epoch(cfg, tokenizer_dir, epoch, world_size)
        if schedule is not None and (schedule.epoch != epoch or schedule.world_size != world_size):
            raise ValueError("schedule was built for another epoch or world size")
        self.num_micro_batches = self.schedule.per_rank
        if not 0 <= start_position <= self.num_micro_batches:
            raise ValueError(f"start_position {start_position} outside [0, {self.num_micro_batches}]")
        self.start_position = start_position
        self.use_ray = ray_has_spare_cpu() if use_ray is None else use_ray
        self.stats = PipelineStats(max_tokens=cfg.max_tokens)
        self.row_group_cache = RowGroupCache()
        self._filler = filler_micro_batch(tokenizer_dir)
        self._started = False

    def __len__(self) -> int:
        return self.num_micro_batches - self.start_position

    def __iter__(self) -> Iterator[MicroBatch]:
        if self._started:
            raise RuntimeError("a TrainIterator is iterated once; build a new one for the next epoch")
        self._started = True
        return self._generate()

    def _generate(self) -> Iterator[MicroBatch]:
        p = self.start_position
        if self.rank == 0 and p == 0:
            self._count_plan_rejects()
        mbs = self.schedule.rank_micro_batches(self.rank)
        units = [u for u in read_units(self.schedule, self.rank, self.cfg.preprocess_batch_size) if u.mbs[-1] >= p]
        yield from self._in_order(mbs, units, self._rows(units))
        for j in range(max(len(mbs), p), self.num_micro_batches):  # this rank's block is short: fillers
            yield self._filler_at(j)

    def _rows(self, units: list[ReadUnit]) -> Iterator[dict[str, Any]]:
        payloads = [unit_payload(self.schedule, self.rank, u, self.cfg, self.tokenizer_dir) for u in units]
        if self.use_ray and payloads:
            return iter_rows_ray(payloads, self.cfg)
        return iter_rows_local(payloads, self.row_group_cache)

    def _in_order(self, mbs: list[np.ndarray], units: list[ReadUnit],
                  rows: Iterator[dict[str, Any]]) -> Iterator[MicroBatch]:
        """Gather rows per micro-batch and emit micro-batches strictly in order once complete, so the output
        does not depend on the order rows arrive in (Ray Data preserves it anyway, which bounds the buffer)."""
        waiting: dict[int, list[dict[str, Any]]] = {}
        next_j = units[0].mbs[0] if units else len(mbs)
        unit_rejects: dict[int, list[dict[str, Any]]] = {}
        remaining = {u.unit: sum(len(mbs[j]) for j in u.mbs) for u in units}
        t0 = time.perf_counter()
        for row in rows:
            j, unit = int(row["mb"]), int(row["unit"])
            waiting.setdefault(j, []).append(row)
            if row["reason"]:
                unit_rejects.setdefault(unit, []).append(self._row_reject(row))
            remaining[unit] -= 1
            if remaining[unit] == 0:  # the unit is complete: its rejects file is whole before we yield past it
                self._write_unit_rejects(unit, unit_rejects.pop(unit, []))
            while next_j < len(mbs) and len(waiting.get(next_j, ())) == len(mbs[next_j]):
                yield from self._emit(sorted(waiting.pop(next_j), key=lambda r: int(r["sample_index"])), t0)
                next_j += 1
                t0 = time.perf_counter()
        if next_j != len(mbs) or waiting:
            raise AssertionError(f"rank {self.rank}: preprocessing lost rows (stopped at micro-batch {next_j})")

    def _emit(self, rows: list[dict[str, Any]], t0: float) -> Iterator[MicroBatch]:
        j = int(rows[0]["mb"])
        if j < self.start_position:  # re-decoded only to rewrite the unit's rejects file; consumed before
            return
        self.stats.wait_seconds += time.perf_counter() - t0
        for r in rows:
            if r["reason"]:
                self.stats.rejects[str(r["reason"])] += 1
        good = [r for r in rows if not r["reason"]]
        yield self._micro_batch(j, good) if good else self._filler_at(j)

    def _micro_batch(self, j: int, good: list[dict[str, Any]]) -> MicroBatch:
        mb = collate([_row_to_sample(r) for r in good], self.epoch, position=j)
        packed = mb.packed
        if packed.num_tokens > self.cfg.max_tokens:  # internal invariant: the plan predicted every length
            raise AssertionError(f"micro-batch {j} has {packed.num_tokens} tokens > {self.cfg.max_tokens}")
        st = self.stats
        for r in good:
            st.buckets[f"{int(r['bucket_h'])}x{int(r['bucket_w'])}"] += 1
            st.sources[str(r["source"])] += 1
        st.num_micro_batches += 1
        st.num_samples += len(good)
        st.num_tokens += packed.num_tokens
        st.num_image_tokens += len(packed.patches)
        st.num_target_tokens += packed.num_target_tokens
        return mb

    def _filler_at(self, j: int) -> MicroBatch:
        self.stats.num_micro_batches += 1
        self.stats.num_fillers += 1
        return MicroBatch(self._filler, torch.zeros(0, dtype=torch.int64), (), self.epoch, position=j)

    def _row_reject(self, row: dict[str, Any]) -> dict[str, Any]:
        return reject_row(str(row["id"]), str(row["source"]), str(row["reason"]), str(row["detail"]),
                          epoch=self.epoch, sample_index=int(row["sample_index"]), rank=self.rank)

    def _count_plan_rejects(self) -> None:
        for r in self.schedule.plan_rejects:
            self.stats.rejects[r["reason"]] += 1
        if self.cfg.rejects_path:  # written even when empty: an epoch's plan file says "checked, none"
            write_rejects(self.cfg.rejects_path, self.epoch, PLAN_REJECTS_FILE, self.schedule.plan_rejects)

    def _write_unit_rejects(self, unit: int, rejects: list[dict[str, Any]]) -> None:
        if self.cfg.rejects_path and rejects:
            write_rejects(self.cfg.rejects_path, self.epoch, unit_rejects_file(self.rank, unit), rejects)


def build_train_iterator(
    cfg: DataConfig,
    tokenizer_dir: str | Path,
    rank: int,
    world_size: int,
    epoch: int,
    start_position: int = 0,
    *,
    use_ray: bool | None = None,
    schedule: EpochSchedule | None = None,
) -> TrainIterator:
    """One rank's packed micro-batches of `epoch`, starting at micro-batch `start_position`.

    `use_ray=None`: Ray Data when Ray is initialised in this process (inside a Ray Train worker it is) and has
    a free CPU, else in-process. `schedule`: reuse one `schedule_epoch` result across ranks (tests, stats)."""
    return TrainIterator(cfg, tokenizer_dir, rank, world_size, epoch, start_position, use_ray, schedule)


def run_pipeline_stats(cfg: FinetuneConfig | DataConfig, world_size: int = 1, epoch: int = 0) -> PipelineStats:
    """Run every rank's iterator of one epoch (sequentially, in this process or on Ray) and print the stats.
    Without a tokenizer path the tiny offline one is built."""
    data = cfg if isinstance(cfg, DataConfig) else cfg.data
    tokenizer_dir = data.tokenizer_path
    if tokenizer_dir is None:
        from otterhd_ray.data.tokenizer import build_tiny_tokenizer

        tokenizer_dir = os.path.join(tempfile.mkdtemp(prefix="otterhd-tok-"), "tokenizer")
        build_tiny_tokenizer(tokenizer_dir)
        print(f"data.tokenizer_path is unset: using the tiny offline tokenizer ({tokenizer_dir})")
    schedule = schedule_epoch(data, tokenizer_dir, epoch, world_size)
    total = PipelineStats(max_tokens=data.max_tokens)
    t0 = time.perf_counter()
    for rank in range(world_size):
        it = build_train_iterator(data, tokenizer_dir, rank, world_size, epoch, schedule=schedule)
        for _ in it:
            pass
        total = total.merge(it.stats)
    seconds = time.perf_counter() - t0
    print(format_stats(total, f"input pipeline, epoch {epoch}, {world_size} rank(s), "
                              f"{schedule.per_rank} micro-batches per rank"))
    print(f"wall time {seconds:.1f} s ({total.num_samples / max(seconds, 1e-9):.1f} samples/s)")
    if data.rejects_path:
        print(f"rejects written under {data.rejects_path}")
    return total
