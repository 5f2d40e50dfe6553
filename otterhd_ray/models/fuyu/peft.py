"""PEFT interop: a literal key map between our adapters and peft's adapter files for transformers' Fuyu.

A PEFT adapter directory is `adapter_config.json` + `adapter_model.safetensors`. For `FuyuForCausalLM`
(transformers 5.x, peft 0.21) peft names the factors of a module `M` (its HF name, e.g.
`model.language_model.layers.0.self_attn.query_key_value`) as `base_model.model.{M}.lora_A.weight` [r, in] and
`base_model.model.{M}.lora_B.weight` [out, r]; ours are `{m}.lora.A` / `{m}.lora.B` with `m` our module name
(`layers.0.self_attn.query_key_value`). The map is spelled out per key from `hf.key_map` (no regex rewriting).

peft also writes `base_model.model.lm_head.base_layer.weight` when `lm_head` is a target (it takes an untied
head for an embedding layer and saves it, "save_embedding_layers"); `PeftModel.from_pretrained` loads it into the
base, so we do too (it equals the base's head unless someone trained it).

Reading checks everything against the model before touching it and fails with one line naming the key: a
different rank, a target the config does not list, a module the model does not have (a deeper or another
base), a shape that differs (another base), a layer the adapter skips, and peft features we do not run
(DoRA, bias training, per-layer rank patterns, modules_to_save).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from otterhd_ray.models.fuyu.hf import key_map
from otterhd_ray.models.fuyu.lora import (
    TARGETS,
    LoraSpec,
    adapters,
    add_lora,
    has_lora,
    spec_from,
    target_modules,
)

logger = logging.getLogger("otterhd_ray.models.fuyu.peft")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# peft writes this head copy when lm_head is a target; loaded into the base as peft does.
HEAD_COPY = f"{PREFIX}lm_head.base_layer.weight"


def hf_module_name(model: nn.Module, ours: str) -> str:
    """HF name of one of our linear modules (`layers.0.mlp.dense_h_to_4h` -> `model.language_model.layers...`)."""
    return key_map(model.config)[f"{ours}.weight"].removesuffix(".weight")


def peft_key_map(model: nn.Module, spec: LoraSpec) -> dict[str, str]:
    """ours -> peft, one entry per adapter tensor of `spec` on `model`."""
    hf = key_map(model.config)
    out = {}
    for name, _ in target_modules(model, spec.targets):
        module = PREFIX + hf[f"{name}.weight"].removesuffix(".weight")
        out[f"{name}.lora.A"] = f"{module}.lora_A.weight"
        out[f"{name}.lora.B"] = f"{module}.lora_B.weight"
    return out


# ------------------------------------------------------------------------------------------------ writing
def adapter_config(spec: LoraSpec, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json fields peft reads for a plain LoRA (everything else at peft's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": list(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "auto_mapping": {
            "base_model_class": "FuyuForCausalLM",
            "parent_library": "transformers.models.fuyu.modeling_fuyu",
        },
    }


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s adapters as a PEFT adapter directory; returns it."""
    from safetensors.torch import save_file

    if not has_lora(model):
        raise ValueError("the model has no LoRA adapters to save")
    if any(a.merged for _, a in adapters(model)):
        raise ValueError("the adapters are merged into the base weights; unmerge before saving them")
    spec: LoraSpec = model.lora_spec
    mapping = peft_key_map(model, spec)
    state = dict(model.named_parameters())
    tensors = {peft: state[ours].detach().to("cpu").contiguous() for ours, peft in mapping.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(adapter_config(spec, base_model_name_or_path), indent=2))
    return out


# ------------------------------------------------------------------------------------------------ reading
def read_spec(adapter_dir: str | Path) -> LoraSpec:
    """Our `LoraSpec` from a PEFT adapter_config.json, refusing the peft features we do not implement."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{adapter_dir} is not a PEFT adapter directory: {CONFIG_FILE} is missing")
    raw = json.loads(path.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    unsupported = {
        "use_dora": lambda v: bool(v), "bias": lambda v: v not in (None, "none"), "rank_pattern": bool,
        "alpha_pattern": bool, "modules_to_save": bool, "layers_to_transform": lambda v: v is not None,
        "fan_in_fan_out": bool, "use_qalora": bool, "trainable_token_indices": bool, "target_parameters": bool,
    }
    for key, bad in unsupported.items():
        if bad(raw.get(key)):
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported by otterhd's LoRA")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        raise ValueError(f"{path}: target_modules is a regex ({targets!r}); list module names instead, e.g. "
                         f"{list(TARGETS[:4])}")
    names = [t.rsplit(".", 1)[-1] for t in targets or []]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ValueError(f"{path}: target_modules {unknown} are not Fuyu linear layers we adapt ({list(TARGETS)})")
    return LoraSpec(
        r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
        targets=tuple(t for t in TARGETS if t in names), rslora=bool(raw.get("use_rslora", False)),
    )


def load_peft_adapter(
    model: nn.Module, adapter_dir: str | Path, expect: LoraSpec | None = None
) -> LoraSpec:
    """Attach the adapter in `adapter_dir` to `model` (in place; base frozen, adapters trainable).

    `expect`: the spec a training config asks for (rank, targets); a different adapter is an error, not a
    silent change of the run."""
    from safetensors import safe_open

    root = Path(adapter_dir)
    spec = read_spec(root)
    if expect is not None:
        for field in ("r", "targets"):
            if getattr(spec, field) != getattr(expect, field):
                raise ValueError(f"{root / CONFIG_FILE}: {field} {getattr(spec, field)} != lora.{field} "
                                 f"{getattr(expect, field)} of the config")
        spec = expect  # alpha, dropout and rslora come from the config (continued training may change them)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{root}: {WEIGHTS_FILE} is missing")
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    head = tensors.pop(HEAD_COPY, None)
    _check_against(model, spec, tensors, head, weights)
    add_lora(model, spec)
    mapping = peft_key_map(model, spec)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, peft in mapping.items():
            params[ours].copy_(tensors[peft])
        if head is not None:
            model.lm_head.weight.copy_(head)
            logger.info("%s: loaded the lm_head copy peft saved with the adapter into the base", weights)
    return spec


def _check_against(
    model: nn.Module, spec: LoraSpec, tensors: dict[str, torch.Tensor], head: torch.Tensor | None, source: Path
) -> None:
    """Every key expected, none unexpected, every shape right — before the model is changed."""
    if has_lora(model):
        raise ValueError(f"cannot load {source}: the model already has LoRA adapters")
    expected = _expected_shapes(model, spec)
    for key, tensor in tensors.items():
        if key not in expected:
            raise ValueError(f"{source}: unexpected key {key} (another base model, or a target the config "
                             f"does not list: {list(spec.targets)})")
        if tuple(tensor.shape) != expected[key]:
            what = "rank" if tensor.shape[0 if key.endswith("lora_A.weight") else 1] != spec.r else "shape"
            raise ValueError(f"{source}: {key} has {what} mismatch: shape {tuple(tensor.shape)}, the model "
                             f"expects {expected[key]} (r={spec.r})")
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{source}: missing key {missing[0]} ({len(missing)} missing; a shallower base or "
                         "an adapter on fewer layers)")
    if head is not None and tuple(head.shape) != tuple(model.lm_head.weight.shape):
        raise ValueError(f"{source}: {HEAD_COPY} shape {tuple(head.shape)} != the model's lm_head "
                         f"{tuple(model.lm_head.weight.shape)} (another base model)")


def _expected_shapes(model: nn.Module, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    hf = key_map(model.config)
    shapes = {}
    for name, linear in target_modules(model, spec.targets):
        module = PREFIX + hf[f"{name}.weight"].removesuffix(".weight")
        shapes[f"{module}.lora_A.weight"] = (spec.r, linear.in_features)
        shapes[f"{module}.lora_B.weight"] = (linear.out_features, spec.r)
    return shapes


def apply_lora_config(model: nn.Module, lora_cfg: Any) -> nn.Module:
    """Fresh adapters per `lora_cfg` (`otterhd_ray.config.LoraConfig`), or the PEFT adapter of
    `lora_cfg.init_from` (checked against it). Here, not in lora.py: lora.py does not import this module."""
    spec = spec_from(lora_cfg)
    if lora_cfg.init_from:
        load_peft_adapter(model, lora_cfg.init_from, expect=spec)
        return model
    return add_lora(model, spec)
