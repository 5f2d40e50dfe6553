"""Low-rank adapters (LoRA) on Fuyu's linear layers, targets named as in transformers' `FuyuForCausalLM`.

The maths and the initialisation are peft's (`tuners/lora/layer.py`), so an adapter trained here and one trained
with peft are interchangeable (`peft.py` maps the file keys):

    y = x W^T + b + (dropout(x) A^T) B^T * scale,   A [r, in] Kaiming-uniform(a=sqrt(5)), B [out, r] zeros,
    scale = alpha / r   (alpha / sqrt(r) with rslora).

Where adapters live: every targeted `nn.Linear` gets a child module `lora` (`LoraAdapter`, parameters `A`, `B`),
so our keys read `layers.3.self_attn.query_key_value.lora.A`. The base weight keeps its key and its values; the
checkpoint layout of the base is the same with or without adapters, and `merge`/`unmerge` are exact inverses up
to rounding.

How the low-rank term reaches the output (never by materialising W + BA·scale during training): every projection
is read through `model.projection(linear)`, which hands the adapter's `(A, B, scale, dropout)` to
`ops.fused.project` with the weight; `project` adds the term. That covers the four decoder projections inside
the (compiled) layer glue for training, prefill and decode, the patch embedding and the LM head of generation.
The chunked loss takes the head as one weight: `head_operands` appends the adapter as extra columns
([h, u] @ [W, B]^T).

Legend: T tokens, N rows, D in-features, F out-features, R rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The decoder projections (Otter's and the community's choice; peft has no Fuyu preset) and the optional extras.
DEFAULT_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
OPTIONAL_TARGETS = ("lm_head", "vision_embed_tokens")
TARGETS = DEFAULT_TARGETS + OPTIONAL_TARGETS
_LAYER_TARGETS = {  # target name -> (submodule of a decoder layer)
    "query_key_value": "self_attn.query_key_value",
    "dense": "self_attn.dense",
    "dense_h_to_4h": "mlp.dense_h_to_4h",
    "dense_4h_to_h": "mlp.dense_4h_to_h",
}


@dataclass(frozen=True)
class LoraSpec:
    """Adapter hyper-parameters (plain values: the model package does not read the pydantic config)."""

    r: int = 64
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora.targets {list(self.targets)}: each must be one of {list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def spec_from(lora_cfg: Any) -> LoraSpec:
    """`otterhd_ray.config.LoraConfig` (or anything with its fields) -> LoraSpec."""
    return LoraSpec(r=lora_cfg.r, alpha=float(lora_cfg.alpha), dropout=float(lora_cfg.dropout),
                    targets=tuple(t for t in TARGETS if t in lora_cfg.targets), rslora=lora_cfg.rslora)


class LoraAdapter(nn.Module):
    """The two factors of one adapted linear layer; `merged` marks that B·A·scale sits in the base weight."""

    def __init__(
        self, in_features: int, out_features: int, spec: LoraSpec,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(spec.r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, spec.r, device=device, dtype=dtype))
        self.scale = spec.scale
        self.dropout = spec.dropout
        self.merged = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """peft's default init: A as nn.Linear's weight (Kaiming-uniform, a=sqrt(5)), B zeros (starts as a no-op)."""
        if self.A.is_meta:
            return
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        """The low-rank term (dropout(x) A^T) B^T * scale; zero once merged."""
        if self.merged:
            return x_ND.new_zeros(*x_ND.shape[:-1], self.B.shape[0])
        return lora_delta(x_ND, self.A, self.B, self.scale, self.dropout, self.training)

    def delta_weight(self) -> torch.Tensor:
        """B A * scale [F, D], computed in float32 (merging an 8B model in bf16 products would lose bits)."""
        return (self.B.float() @ self.A.float()) * self.scale


def lora_delta(
    x_ND: torch.Tensor, A_RD: torch.Tensor, B_FR: torch.Tensor, scale: float, p: float, training: bool
) -> torch.Tensor:
    """(dropout(x) A^T) B^T * scale: two thin matmuls, the [F, D] product B·A never exists."""
    if p > 0.0 and training:
        x_ND = F.dropout(x_ND, p, training=True)
    return F.linear(F.linear(x_ND, A_RD), B_FR) * scale


# ------------------------------------------------------------------------------------------ attaching
def target_modules(model: nn.Module, targets: tuple[str, ...]) -> Iterator[tuple[str, nn.Linear]]:
    """(our module name, module) of every targeted linear layer, in a fixed order (layers first)."""
    for i, layer in enumerate(model.layers):
        for target, sub in _LAYER_TARGETS.items():
            if target in targets:
                yield f"layers.{i}.{sub}", layer.get_submodule(sub)
    for target in OPTIONAL_TARGETS:
        if target in targets:
            yield target, getattr(model, target)


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Attach adapters to `model` in place (on its device and dtype), freeze every base parameter, return it."""
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, linear in target_modules(model, spec.targets):
        w = linear.weight
        linear.lora = LoraAdapter(linear.in_features, linear.out_features, spec, device=w.device, dtype=w.dtype)
        linear.lora.train(model.training)
    model.lora_spec = spec
    return model


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "lora_spec", None) is not None


def adapters(model: nn.Module) -> Iterator[tuple[str, LoraAdapter]]:
    """(module name, adapter) of every adapted layer."""
    for name, module in model.named_modules():
        if isinstance(module, LoraAdapter):
            yield name.removesuffix(".lora"), module


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' tensors, under our keys (`layers.0.self_attn.dense.lora.A`, ...)."""
    return {k: v for k, v in model.state_dict().items() if ".lora." in f".{k}"}


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """W += B A scale for every adapter (evaluation, export); the adapters then contribute nothing."""
    for name, adapter in adapters(model):
        if not adapter.merged:
            base = model.get_submodule(name)
            base.weight.copy_((base.weight.float() + adapter.delta_weight()).to(base.weight.dtype))
            adapter.merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """The inverse of `merge` (exact in float32; a bf16 base keeps the rounding of the round trip)."""
    for name, adapter in adapters(model):
        if adapter.merged:
            base = model.get_submodule(name)
            base.weight.copy_((base.weight.float() - adapter.delta_weight()).to(base.weight.dtype))
            adapter.merged = False


def remove_lora(model: nn.Module, merge_first: bool = True) -> nn.Module:
    """Drop every adapter (merging it into the base first unless told not to); the model is plain again."""
    if merge_first:
        merge(model)
    for name, _ in list(adapters(model)):
        del model.get_submodule(name).lora
    model.lora_spec = None
    return model


def head_operands(h_ND: torch.Tensor, head: Any, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, weight) for the chunked LM-head loss: h W^T + u B^T == [h, u] [W, B]^T with u = dropout(h) A^T s.

    `head` is lm_head's `Projection` (model.projection). Without an (unmerged) adapter this is `(h, W)`. With one,
    the frozen W is concatenated with B once per step ([V, D + R]); the loss's weight gradient then also covers
    W's columns, which are discarded (cost: one head-sized buffer and matmul; lm_head is an optional target)."""
    if head.lora_A is None:
        return h_ND, head.weight
    x = F.dropout(h_ND, head.lora_dropout, training=True) if head.lora_dropout > 0 and training else h_ND
    u_NR = F.linear(x, head.lora_A) * head.lora_scale
    return torch.cat([h_ND, u_NR], dim=-1), torch.cat([head.weight.detach(), head.lora_B], dim=-1)
