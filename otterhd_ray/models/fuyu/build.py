"""The application-level factory: a `FuyuForCausalLM` from our `ModelConfig` (random init or an HF directory).

Kept apart from `model.py` so the model does not import its HF loader (`hf.py` imports the model, this module
imports both). `build_model` is what training and the CLI call; `new_model` (defined beside the model class,
because `hf.py` builds on the meta device with it) allocates a randomly initialised model in its dtype and device.
"""

from __future__ import annotations

from typing import Any

import torch

from otterhd_ray.models.fuyu.config import FuyuModelConfig, config_for_tokenizer, flavour_config
from otterhd_ray.models.fuyu.hf import load_hf
from otterhd_ray.models.fuyu.model import FuyuForCausalLM, new_model

__all__ = ["build_model", "new_model"]


def build_model(
    model_cfg: Any,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tokenizer: Any = None,
) -> FuyuForCausalLM:
    """Build from `otterhd_ray.config.ModelConfig`: weights from `model_cfg.path` when set, else random init."""
    fused = model_cfg.fused_ops
    if model_cfg.compile and fused in ("auto", "none"):
        # `compile` means the torch.compile regions around attention (the glue of every layer).
        fused = "compile"
    switches = dict(
        attention=model_cfg.attention,
        fused_ops=fused,
        activation_checkpointing=model_cfg.activation_checkpointing,
        loss_chunk_size=model_cfg.loss_chunk_size,
        selective_every=model_cfg.selective_every,
        lean_step=model_cfg.lean_step,
    )
    if model_cfg.path:
        model = load_hf(
            model_cfg.path, dtype=dtype, device=device, allow_pickle=model_cfg.allow_pickle,
            num_layers=model_cfg.num_layers, **switches,
        )
    else:
        cfg: FuyuModelConfig = flavour_config(model_cfg.flavour)
        if model_cfg.num_layers:
            cfg = cfg.replace(num_layers=model_cfg.num_layers)
        if tokenizer is not None:
            cfg = config_for_tokenizer(cfg, tokenizer)
        model = new_model(cfg, dtype=dtype, device=device, **switches)
    model.resolve(device)  # fail at build time, not at the first step, when a backend cannot run here
    return model
