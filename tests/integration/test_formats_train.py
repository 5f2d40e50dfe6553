"""A converted LLaVA-format set fine-tunes the debug model end to end (in-process loop, no cluster), text-only
samples included: they pass the index, the schedule, preprocessing (no patches) and the model's loss."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from otterhd_ray.data.formats import ConvertRequest, convert
from otterhd_ray.data.tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from make_format_fixtures import make_format_fixtures  # noqa: E402

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llava_train")
    make_format_fixtures(root / "fx")
    stats = convert(ConvertRequest("llava", [str(root / "fx" / "llava" / "llava.json")], str(root / "shards")),
                    say=lambda _line: None)
    assert stats.num_samples == 5 and stats.num_text_only == 1
    build_tiny_tokenizer(root / "tokenizer")
    return root


def overrides(root: Path, out: Path) -> list[str]:
    return [f"data.datasets=[{{name: llava, path: {root / 'shards'}}}]", f"data.tokenizer_path={root / 'tokenizer'}",
            f"data.index_cache_dir={root / 'index'}", "data.max_tokens=1024", "data.buckets.long_sides=[60]",
            "data.buckets.native=false", f"data.rejects_path={out / 'rejects'}", "train.precision=fp32",
            f"train.output_dir={out}", "train.log_every_steps=1", "model.attention=eager", "deepspeed.enabled=false",
            "ray.num_workers=0", f"ray.storage_path={out / 'ray'}", "ray.name=llava", "optim.lr=1e-3",
            "train.epochs=2"]


def test_text_only_samples_go_through_the_pipeline(converted, tmp_path):
    from otterhd_ray.config import load_finetune_config
    from otterhd_ray.data.pipeline import build_train_iterator
    from otterhd_ray.models.fuyu import flavour_config, new_model

    cfg = load_finetune_config(None, [*overrides(converted, tmp_path), "data.max_samples_per_batch=1"])
    batches = list(build_train_iterator(cfg.data, converted / "tokenizer", 0, 1, 0, use_ray=False))
    assert sorted(i for mb in batches for i in mb.sample_id) == [
        "ok-end", "ok-mid", "ok-multiturn", "ok-start", "ok-text-only"]
    text_only = next(mb for mb in batches if mb.sample_id == ("ok-text-only",))
    assert text_only.packed.patches.shape == (0, 2700) and text_only.packed.num_target_tokens > 0
    model = new_model(flavour_config("debug"), attention="eager")
    loss_sum, n = model.loss(text_only.packed)
    loss_sum.backward()
    assert torch.isfinite(loss_sum) and n > 0
    grad = model.vision_embed_tokens.weight.grad  # touched with a zero gradient, so ranks' reductions match
    assert grad is not None and float(grad.abs().sum()) == 0.0


def test_finetune_on_a_converted_llava_set(converted, tmp_path):
    from otterhd_ray.config import load_finetune_config
    from otterhd_ray.train.trainer import run_finetune

    result = run_finetune(load_finetune_config(None, overrides(converted, tmp_path)))
    assert result.checkpoint is not None
    history = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history and all(math.isfinite(h["loss"]) for h in history)  # logged every step
    assert sum(h["samples"] for h in history) == 2 * 5  # two epochs of the 5 accepted samples, text-only included
