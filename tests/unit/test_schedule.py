"""LR schedules, AdamW decay groups and epoch sizing — each of the seed's recipe bugs pinned by a test.

Seed bugs (REFERENCE.md): the schedule was sized for twice the steps it ran (decay stopped mid-way), weight decay
reached no Fuyu parameter, each "epoch" stopped after half the data. (Accumulation: tests/integration/
test_train_engine.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from otterhd_ray.config import FinetuneConfig
from otterhd_ray.models.fuyu import flavour_config, new_model
from otterhd_ray.train.loop import plan_steps
from otterhd_ray.train.schedule import (
    build_optimizer,
    build_scheduler,
    decay_parameter_names,
    lr_factor_fn,
    num_warmup_steps,
)


def lrs_over_run(kind: str, total: int, warmup_ratio: float, base_lr: float = 1.0) -> list[float]:
    """LR used by each optimizer step 1..total, then the LR after the last step."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = build_scheduler(opt, kind, total, warmup_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out.append(opt.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decay_ends_exactly_at_last_step(kind):
    # Seed bug: sized for 2x the steps, the LR after the run was still ~half the peak. Ours reaches 0 exactly
    # after the last optimizer step and every step before it has a positive LR.
    total = 37
    lrs = lrs_over_run(kind, total, 0.1)
    assert lrs[-1] == 0.0
    assert all(lr > 0 for lr in lrs[:-1])
    assert lrs[-2] < 0.1  # the last update is already small: the decay was used to the end
    seed_buggy = lr_factor_fn(kind, 2 * total, 0.1)(total)
    assert seed_buggy > 0.4  # what the seed's schedule left: documents the difference this test pins


def test_linear_shape_and_warmup():
    total, ratio = 100, 0.1
    lrs = lrs_over_run("linear", total, ratio)
    warm = num_warmup_steps(total, ratio)
    assert warm == 10
    assert lrs[:warm] == sorted(lrs[:warm]) and lrs[0] > 0  # rising, first step already trains
    assert lrs[warm] == pytest.approx(1.0)
    decay = lrs[warm:]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[45] == pytest.approx(1 - 45 / 90)


def test_cosine_midpoint_and_constant():
    total = 41
    f = lr_factor_fn("cosine", total, 0.0)
    assert f(0) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 20 / 41)))
    assert f(total) == pytest.approx(0.0, abs=1e-12)
    c = lr_factor_fn("constant", total, 0.1)
    assert [c(s) for s in range(5, total)] == [1.0] * (total - 5)
    assert c(0) < 1.0  # constant-with-warmup


def test_warmup_ratio_rounding_and_bad_input():
    assert num_warmup_steps(10, 0.01) == 1  # the seed's 0.01 still warms up on a short run
    assert num_warmup_steps(1000, 0.01) == 10
    assert num_warmup_steps(10, 0.0) == 0
    with pytest.raises(ValueError):
        num_warmup_steps(0, 0.1)
    with pytest.raises(ValueError):
        lr_factor_fn("polynomial", 10, 0.1)


def test_decay_groups_reach_every_matrix_of_fuyu():
    # Seed bug: its name patterns matched no Fuyu parameter, so weight_decay=0.1 did nothing.
    model = new_model(flavour_config("debug"))
    decay, no_decay = decay_parameter_names(model)
    params = dict(model.named_parameters())
    assert set(decay) | set(no_decay) == set(params) and not set(decay) & set(no_decay)
    for name, p in params.items():
        if name == "embed_tokens.weight":
            assert name in no_decay
        elif p.ndim >= 2:
            assert name in decay, name  # qkv, dense, MLP, patch projection, lm_head
        else:
            assert name in no_decay, name  # biases, LayerNorm and q/k-norm weights
    assert "lm_head.weight" in decay and "vision_embed_tokens.weight" in decay
    decayed = sum(params[n].numel() for n in decay)
    assert decayed > 0.5 * sum(p.numel() for p in params.values())


def test_optimizer_groups_apply_decay_only_where_configured():
    model = new_model(flavour_config("debug"))
    cfg = FinetuneConfig.model_validate({"optim": {"weight_decay": 0.1, "lr": 1e-3}})
    opt = build_optimizer(model, cfg.optim)
    by_decay = {g["weight_decay"]: g for g in opt.param_groups}
    assert set(by_decay) == {0.1, 0.0}
    # One decoupled-decay step with zero gradient: decayed weights shrink by lr*wd, the others do not move.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["lm_head.weight"], before["lm_head.weight"] * (1 - 1e-3 * 0.1))
    assert torch.equal(after["embed_tokens.weight"], before["embed_tokens.weight"])
    assert torch.equal(after["final_layernorm.weight"], before["final_layernorm.weight"])


class _CountingSource:
    def __init__(self, counts: list[int]):
        self.counts = counts

    def num_micro_batches(self, epoch: int) -> int:
        return self.counts[epoch]

    def iter_epoch(self, epoch: int, start: int = 0):
        raise NotImplementedError


def test_epoch_length_covers_every_micro_batch():
    # Seed bug: each "epoch" stopped after half the data. Steps per epoch = ceil(micro-batches / accumulation):
    # 7 micro-batches with accumulation 2 are 4 steps (the last one has 1 micro-batch), never 3 or 2.
    cfg = FinetuneConfig.model_validate({"train": {"epochs": 3, "gradient_accumulation_steps": 2}})
    assert plan_steps(cfg, _CountingSource([7, 8, 1])) == [4, 4, 1]
    cfg1 = FinetuneConfig.model_validate({"train": {"epochs": 1, "gradient_accumulation_steps": 1}})
    assert plan_steps(cfg1, _CountingSource([5])) == [5]
    with pytest.raises(ValueError, match="no micro-batches"):
        plan_steps(cfg1, _CountingSource([0]))
