"""Fuyu model: config flavours, the packed single-device model, HF interop."""

from otterhd_ray.models.fuyu.config import FLAVOURS, FuyuModelConfig, config_for_tokenizer, flavour_config
from otterhd_ray.models.fuyu.hf import load_hf, save_hf
from otterhd_ray.models.fuyu.model import FuyuForCausalLM, build_model, new_model, normalize_patches

__all__ = [
    "FLAVOURS",
    "FuyuForCausalLM",
    "FuyuModelConfig",
    "build_model",
    "config_for_tokenizer",
    "flavour_config",
    "load_hf",
    "new_model",
    "normalize_patches",
    "save_hf",
]
