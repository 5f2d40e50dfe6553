"""The input pipeline end to end: synthetic shards with every kind of bad row -> per-rank packed micro-batches.

Checks the contracts of otterhd_ray/data/pipeline/: every good sample in exactly one micro-batch of one rank,
the same number of micro-batches on every rank, bad rows in the rejects table with their reason (and nothing else
lost), deterministic reshuffle per epoch, exact resume, and Ray Data giving the same batches as the in-process path.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from otterhd_ray.config import BucketConfig, DataConfig
from otterhd_ray.data.pipeline import (
    PipelineStats,
    build_train_iterator,
    format_stats,
    read_rejects,
    read_units,
    schedule_epoch,
)
from otterhd_ray.data.shards import SHARD_SCHEMA
from otterhd_ray.data.synth import synthesize
from otterhd_ray.data.tokenizer import fuyu_tokens, load_tokenizer

MAX_TOKENS = 4096


def _jpeg(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    stats = synthesize(root / "syn", num_train=40, num_bench=0, seed=1, num_bad=11)
    assert stats["num_bad"] == 6 and stats["num_odd"] == 5
    # Cases synth does not make: a text longer than any budget, and a row without an id (written without the
    # ShardWriter, which refuses it — data from elsewhere may still have it).
    conv = [{"role": "user", "text": "Describe it."}, {"role": "assistant", "text": "the " * 6000}]
    ok = [{"role": "user", "text": "What color?"}, {"role": "assistant", "text": "red"}]
    rows = [
        {"id": "long-0", "image": _jpeg(64, 64), "image_id": "l", "conversations": conv, "source": "extra"},
        {"id": None, "image": _jpeg(64, 64), "image_id": "n", "conversations": ok, "source": "extra"},
        {"id": "fine-0", "image": _jpeg(200, 500), "image_id": "f", "conversations": ok, "source": "extra"},
    ]
    (root / "extra").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, SHARD_SCHEMA), root / "extra" / "shard-00000.parquet")
    # A file from elsewhere that lacks the image column altogether: its rows are rejects, the job goes on.
    no_image = pa.table({"id": ["noimg-0", "noimg-1"], "conversations": [ok, ok], "source": ["extra", "extra"]})
    pq.write_table(no_image, root / "extra" / "shard-00001.parquet")
    return root


def _cfg(data_dir, tmp_path, **kw) -> DataConfig:
    base = dict(
        datasets=[{"name": "syn", "path": str(data_dir / "syn" / "train")},
                  {"name": "extra", "path": str(data_dir / "extra")}],
        max_tokens=MAX_TOKENS,
        preprocess_batch_size=8,
        index_cache_dir=str(data_dir / "index-cache"),
        rejects_path=str(tmp_path / "rejects"),
        shuffle_window=32,
        packing_buffer_size=32,
    )
    base.update(kw)
    return DataConfig(**base)


def _all_ids(data_dir) -> set:
    ids = set()
    for sub in ("syn/train", "extra"):
        for f in sorted((data_dir / sub).glob("*.parquet")):
            ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return ids


def _run(cfg, tok, world, epoch=0, **kw):
    schedule = schedule_epoch(cfg, tok, epoch, world)
    out, stats = [], []
    for rank in range(world):
        it = build_train_iterator(cfg, tok, rank, world, epoch, schedule=schedule, **kw)
        out.append(list(it))
        stats.append(it.stats)
    return schedule, out, stats


def test_every_good_sample_once_equal_counts_and_rejects(data_dir, tmp_path, tiny_tokenizer_dir):
    cfg = _cfg(data_dir, tmp_path)
    schedule, per_rank, stats = _run(cfg, tiny_tokenizer_dir, world=2)
    assert len(per_rank[0]) == len(per_rank[1]) == schedule.per_rank > 0
    image_id = fuyu_tokens(load_tokenizer(tiny_tokenizer_dir)).image

    trained_ids, trained_index = [], []
    for rank_mbs in per_rank:
        for pos, mb in enumerate(rank_mbs):
            assert mb.position == pos and mb.epoch == 0
            p = mb.packed
            n = len(p.input_ids)
            assert n <= MAX_TOKENS and p.cu_seqlens[-1] == n and p.cu_seqlens.dtype == torch.int32
            assert int((p.input_ids == image_id).sum()) == p.patches.shape[0]
            assert p.num_target_tokens == int((p.target_ids != -100).sum())
            if mb.is_filler:
                assert p.num_target_tokens == 0 and len(mb.sample_index) == 0
                continue
            assert p.num_target_tokens > 0
            # the schedule predicted every length exactly, from headers and text alone
            assert sum(int(schedule.length[i]) for i in mb.sample_index.tolist()) == n
            trained_ids += mb.sample_id
            trained_index += mb.sample_index.tolist()
    assert len(trained_index) == len(set(trained_index)) and len(trained_ids) == len(set(trained_ids))

    rejects = read_rejects(cfg.rejects_path, epoch=0).to_pylist()
    rejected_ids = {r["id"] for r in rejects}
    all_ids = _all_ids(data_dir)
    must_reject = {i for i in all_ids if i and i.startswith("bad-")} | {"long-0", "noimg-0", "noimg-1"}
    assert must_reject <= rejected_ids
    assert {i for i in all_ids if i and i.startswith("odd-")} <= set(trained_ids)  # converted, not rejected
    # nothing else lost: trained + rejected is every row (the id-less row is rejected under a placeholder id)
    assert len(rejected_ids) == len(must_reject) + 1
    assert set(trained_ids) | must_reject == (all_ids - {None})
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons["long-0"] == "too_long"
    assert reasons["bad-decompression_bomb-0004"] == "image_too_large"
    assert reasons["bad-truncated_jpeg-0000"] == "truncated_image"  # header fine: caught while decoding
    assert "missing_id" in reasons.values() and reasons["noimg-1"] == "missing_image"
    assert all(r["source"] for r in rejects) and all(r["sample_index"] >= 0 for r in rejects)

    total = stats[0].merge(stats[1])
    assert total.num_rejects == len(rejects) and total.num_samples == len(trained_ids)
    assert total.num_micro_batches == 2 * schedule.per_rank
    text = format_stats(total)
    assert "packing efficiency" in text and "too_long=1" in text and "buckets" in text


def test_a_sample_longer_than_planned_is_rejected_not_packed(data_dir, tmp_path, tiny_tokenizer_dir):
    # Safety net behind the exact-length plan: if the processor ever made more tokens than the schedule
    # predicted, the sample is rejected (length_mismatch) instead of overflowing the micro-batch.
    cfg = _cfg(data_dir, tmp_path)
    schedule = schedule_epoch(cfg, tiny_tokenizer_dir, 0, 1)
    victim = int(schedule.micro_batches[0][0])
    schedule.length[victim] -= 1
    mbs = list(build_train_iterator(cfg, tiny_tokenizer_dir, 0, 1, 0, schedule=schedule))
    assert len(mbs) == schedule.per_rank
    assert victim not in {i for mb in mbs for i in mb.sample_index.tolist()}
    rejects = read_rejects(cfg.rejects_path, epoch=0).to_pylist()
    assert [r["reason"] for r in rejects if r["sample_index"] == victim] == ["length_mismatch"]


def test_resume_continues_exactly(data_dir, tmp_path, tiny_tokenizer_dir):
    cfg = _cfg(data_dir, tmp_path, preprocess_batch_size=4)
    schedule = schedule_epoch(cfg, tiny_tokenizer_dir, 0, 2)
    full = build_train_iterator(cfg, tiny_tokenizer_dir, 1, 2, 0, schedule=schedule)
    reference = list(full)
    assert len(reference) >= 3
    first = build_train_iterator(cfg, tiny_tokenizer_dir, 1, 2, 0, schedule=schedule)
    head = [mb for _, mb in zip(range(2), first, strict=False)]  # "crash" after two micro-batches
    resumed = build_train_iterator(cfg, tiny_tokenizer_dir, 1, 2, 0, start_position=2)
    assert len(resumed) == len(reference) - 2
    tail = list(resumed)
    assert [mb.position for mb in tail] == list(range(2, len(reference)))
    for a, b in zip(head + tail, reference, strict=True):
        assert torch.equal(a.packed.input_ids, b.packed.input_ids)
        assert torch.equal(a.packed.patches, b.packed.patches) and torch.equal(a.sample_index, b.sample_index)
    # stats of the resumed part + what was consumed before never double count
    assert resumed.stats.num_samples == sum(len(mb.sample_index) for mb in tail)
    with pytest.raises(ValueError):
        build_train_iterator(cfg, tiny_tokenizer_dir, 1, 2, 0, start_position=len(reference) + 1)


def test_each_row_group_is_read_about_once(data_dir, tmp_path, tiny_tokenizer_dir):
    cfg = _cfg(data_dir, tmp_path, preprocess_batch_size=2)  # many small units spread over the row groups
    it = build_train_iterator(cfg, tiny_tokenizer_dir, 0, 1, 0, use_ray=False)
    assert len(list(it)) == it.num_micro_batches
    reads = it.row_group_cache.reads  # the iterator owns its cache: nothing shared between iterators
    assert reads and max(reads.values()) == 1
    assert sum(reads.values()) < len(read_units(it.schedule, 0, 2))  # fewer reads than units


def test_epochs_reshuffle_deterministically(data_dir, tmp_path, tiny_tokenizer_dir):
    cfg = _cfg(data_dir, tmp_path)
    e0, e0b, e1 = (schedule_epoch(cfg, tiny_tokenizer_dir, e, 2) for e in (0, 0, 1))
    flat = lambda s: [s.sample_id[i] for mb in s.micro_batches for i in mb.tolist()]  # noqa: E731
    assert flat(e0) == flat(e0b)
    assert flat(e0) != flat(e1) and sorted(flat(e0)) == sorted(flat(e1))
    assert not np.array_equal(e0.size_hw, e1.size_hw)  # buckets redrawn per epoch


def test_many_ranks_get_fillers_and_equal_counts(data_dir, tmp_path, tiny_tokenizer_dir):
    cfg = _cfg(data_dir, tmp_path, max_tokens=16384)
    schedule, per_rank, _ = _run(cfg, tiny_tokenizer_dir, world=8)
    assert len(schedule.micro_batches) < 8 * schedule.per_rank  # some rank must be topped up
    assert {len(mbs) for mbs in per_rank} == {schedule.per_rank}
    fillers = [mb for mbs in per_rank for mb in mbs if mb.is_filler]
    assert fillers and all(mb.packed.num_target_tokens == 0 and mb.sample_id == () for mb in fillers)
    assert all(mb.packed.patches.shape == (1, 2700) and len(mb.packed.input_ids) == 3 for mb in fillers)


def test_otterhd_mode_one_square_per_micro_batch(data_dir, tmp_path, tiny_tokenizer_dir):
    cfg = _cfg(data_dir, tmp_path, buckets=BucketConfig(mode="otterhd"))
    _, per_rank, stats = _run(cfg, tiny_tokenizer_dir, world=1)
    image_id = fuyu_tokens(load_tokenizer(tiny_tokenizer_dir)).image
    for mb in per_rank[0]:
        cu, ids = mb.packed.cu_seqlens.tolist(), mb.packed.input_ids
        per_sample = {int((ids[a:b] == image_id).sum()) for a, b in zip(cu[:-1], cu[1:], strict=True)}
        assert len(per_sample) == 1 and per_sample <= {15 * 15, 18 * 18, 26 * 26, 1}  # one square per batch
    assert set(stats[0].buckets) <= {"448x448", "512x512", "768x768"}
    sched = schedule_epoch(cfg, tiny_tokenizer_dir, 0, 1)
    for mb in sched.micro_batches:
        assert len({tuple(sched.size_hw[i]) for i in mb.tolist()}) == 1


@pytest.mark.timeout(240)
def test_ray_data_path_gives_the_same_batches(data_dir, tmp_path, tiny_tokenizer_dir):
    ray = pytest.importorskip("ray")
    cfg = _cfg(data_dir, tmp_path, preprocess_concurrency=2)
    schedule = schedule_epoch(cfg, tiny_tokenizer_dir, 0, 2)
    local = list(build_train_iterator(cfg, tiny_tokenizer_dir, 0, 2, 0, schedule=schedule, use_ray=False))
    local_rank1 = [mb.sample_index.tolist()
                   for mb in build_train_iterator(cfg, tiny_tokenizer_dir, 1, 2, 0, schedule=schedule, use_ray=False)]

    def in_worker(rank: int) -> tuple[list, bool]:
        # What a Ray Train worker does: build its own iterator; auto mode picks Ray Data (Ray is up, CPUs free).
        it = build_train_iterator(cfg, tiny_tokenizer_dir, rank, 2, 0)
        return [mb.sample_index.tolist() for mb in it], it.use_ray

    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    try:
        it = build_train_iterator(cfg, tiny_tokenizer_dir, 0, 2, 0, schedule=schedule, use_ray=True)
        remote = list(it)
        from_worker, used_ray = ray.get(ray.remote(num_cpus=0.5)(in_worker).remote(1), timeout=180)
        # with Ray up, a schedule builds the missing files' indexes in Ray tasks
        fresh = cfg.model_copy(update={"index_cache_dir": str(tmp_path / "fresh-index")})
        fresh_schedule = schedule_epoch(fresh, tiny_tokenizer_dir, 0, 2)
    finally:
        ray.shutdown()
    assert len(remote) == len(local)
    for a, b in zip(remote, local, strict=True):
        for key in ("input_ids", "target_ids", "position_ids", "cu_seqlens", "patches"):
            assert torch.equal(getattr(a.packed, key), getattr(b.packed, key)), key
        assert torch.equal(a.sample_index, b.sample_index) and a.sample_id == b.sample_id
    assert isinstance(it.stats, PipelineStats) and it.stats.num_samples > 0
    assert used_ray and from_worker == local_rank1
    assert len(fresh_schedule.plan) == sum(pq.ParquetFile(f).metadata.num_rows
                                           for sub in ("syn/train", "extra") for f in (data_dir / sub).glob("*.parquet"))
    assert len(list((tmp_path / "fresh-index").glob("*.parquet"))) == 3
    assert [mb.tolist() for mb in fresh_schedule.micro_batches] == [mb.tolist() for mb in schedule.micro_batches]
