"""Learning-rate schedules and AdamW parameter groups, all sized in optimizer steps.

Two of the seed's recipe bugs live here (REFERENCE.md): its schedule was sized for twice the optimizer steps it
ran (so the decay stopped half-way) and its weight decay matched no Fuyu parameter. Both are pinned by
`tests/unit/test_schedule.py`.

Which parameters are decayed (the decision, and why):
- decayed: every weight matrix of ≥ 2 dims that is a linear map (QKV, output and MLP projections, the patch
  projection `Linear(2700 → D)` and the untied `lm_head`);
- not decayed: every 1-dim tensor (biases, LayerNorm weights and biases, the per-head q/k LayerNorms): decay
  pulls a norm's gain towards 0 and a bias towards 0, which are not "smaller is simpler" directions;
- not decayed: the token embedding table. Decoupled AdamW decay shrinks *every* row every step while only the
  rows of tokens present in the batch get a gradient, so rare tokens (Fuyu has a 262k vocabulary) would fade
  away during a short fine-tune. Identified by module type (`nn.Embedding`), not by name, so a renamed module
  cannot silently move groups (the seed's name-matching is what made its decay reach nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from otterhd_ray.config import OptimConfig


def num_warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length in optimizer steps: `ceil(ratio * total)` so any non-zero ratio warms up at least 1 step."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return min(total_steps, math.ceil(warmup_ratio * total_steps))


def lr_factor_fn(kind: str, total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base LR after `step` optimizer steps (the LR used by step `step + 1`).

    Linear and cosine reach exactly 0 at `step == total_steps`, i.e. right after the last optimizer step, so
    the last update of the run is the smallest one and no part of the decay is left unused.
    """
    warmup = num_warmup_steps(total_steps, warmup_ratio)
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            # (step + 1): the very first update already uses a non-zero LR (a zero-LR step is wasted data).
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / decay_steps)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown scheduler {kind!r}: expected constant, linear or cosine")

    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown scheduler {kind!r}: expected constant, linear or cosine")
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` stepped once per optimizer step (never per micro-step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(kind, total_steps, warmup_ratio))


def decay_parameter_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """Split trainable parameter names into (decayed, not decayed); see the module docstring for the rule."""
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_params:
            no_decay.append(name)
        else:
            decay.append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups; the no-decay group always has `weight_decay = 0`."""
    decay, no_decay = decay_parameter_names(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "names": decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "names": no_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW over `param_groups` (DeepSpeed wraps it; `torch_adam` keeps it unfused on CPU)."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, optim.weight_decay)]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
