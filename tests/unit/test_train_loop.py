"""The loop's seam without Ray, DeepSpeed or the data pipeline: a fake data source and model through the typed
factory keywords, the torch engine, `LocalContext` checkpoints, and the typed `faults:` section."""

from __future__ import annotations

import json

import pytest
import torch

from otterhd_ray.config import load_finetune_config
from otterhd_ray.models.fuyu import flavour_config, new_model
from otterhd_ray.train.loop import InjectedStop, LocalContext, train_loop_per_worker
from tests.helpers import micro_batch, sample

CFG = flavour_config("debug")


class FixedSource:
    """Two packed micro-batches per epoch, the same every epoch."""

    def __init__(self) -> None:
        self.batches = []
        for i in range(2):
            samples = [sample(CFG, 2, 3, 8, seed=2 * i), sample(CFG, 1, 2, 6, seed=2 * i + 1, num_targets=4)]
            self.batches.append(micro_batch(samples, first_index=2 * i, position=i))

    def num_micro_batches(self, epoch: int) -> int:
        return len(self.batches)

    def iter_epoch(self, epoch: int, start: int = 0):
        return iter(self.batches[start:])


def _run(tmp_path, *overrides: str) -> LocalContext:
    cfg = load_finetune_config(None, [
        "deepspeed.enabled=false", "train.epochs=2", "train.log_every_steps=1", "train.precision=fp32",
        f"train.output_dir={tmp_path / 'out'}", "optim.lr=1e-3", *overrides,
    ])
    ctx = LocalContext(tmp_path / "ckpt")
    train_loop_per_worker(
        {"config": cfg.model_dump(mode="json")}, ctx,
        model_factory=lambda cfg, device: new_model(CFG, attention="eager"),
        data_source_factory=lambda cfg, rank, world: FixedSource(),
    )
    return ctx


def test_factories_drive_the_loop_to_a_checkpoint(tmp_path):
    ctx = _run(tmp_path)
    history = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]  # 2 epochs x 2 micro-batches, accumulation 1
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["samples_seen"] == 8
    assert [p.name for p in ctx.checkpoints] == ["checkpoint_000004"]


def test_stop_fault_from_the_config_stops_after_that_step(tmp_path):
    with pytest.raises(InjectedStop, match="after step 2"):
        _run(tmp_path, "train.checkpoint_every_steps=1", "faults.stop_after_step=2")
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint_*")) == [
        "checkpoint_000001", "checkpoint_000002",
    ]


def test_metric_window_sums_named_fields_and_resets():
    from otterhd_ray.train.metrics import MicroCounts, WindowAccumulator

    window = WindowAccumulator(torch.device("cpu"))
    window.add_micro(torch.tensor(6.0), MicroCounts(target_tokens=4, tokens=10, samples=2, seq_sq=52.0))
    window.add_micro(torch.tensor(2.0), MicroCounts(target_tokens=0, tokens=3, samples=0, seq_sq=9.0))  # filler
    window.add_step(torch.tensor(0.5))
    window.data_wait_s = 0.0
    stats = window.read(world_size=1)
    assert stats.loss == 8.0 / 4 and stats.grad_norm == 0.5
    assert (stats.target_tokens, stats.tokens, stats.samples) == (4, 13, 2)
    assert stats.mean_seq_sq == 61.0 / 13 and stats.tokens_per_s == 13 / stats.window_s
    assert list(stats.logged()) == [
        "loss", "grad_norm", "tokens_per_s", "tokens_per_s_per_worker", "samples_per_s", "target_tokens", "tokens",
        "samples", "data_wait_fraction", "window_s",
    ]
    assert window.read(world_size=1).tokens == 0  # read resets the window
