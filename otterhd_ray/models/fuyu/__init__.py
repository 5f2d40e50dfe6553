"""Fuyu model: config flavours, the input contract, the packed single-device model, decoding, HF interop.

Modules, each importing only those listed before it (no cycles): `inputs` (patch format, image box, ignore
index, `PackedBatch`), `config` (architecture, flavours), `attention` (how a layer attends: packed or over a KV
cache), `generate` (decoding; sees the model through a protocol), `model` (layers, packed forward, loss; its
`generate` method wraps `generate.generate`), `hf` (transformers key map, load/save), `build` (`build_model`
from our `ModelConfig`). Importing the package loads torch and nothing of transformers, PIL, pydantic or yaml.
The function `generate.generate` is not re-exported here: the name would shadow the `generate` submodule
(`model.generate(...)` is the way to call it).
"""

from otterhd_ray.models.fuyu.build import build_model
from otterhd_ray.models.fuyu.config import FLAVOURS, FuyuModelConfig, config_for_tokenizer, flavour_config
from otterhd_ray.models.fuyu.generate import SamplingParams, prefix_groups, stream_generate
from otterhd_ray.models.fuyu.hf import load_hf, save_hf
from otterhd_ray.models.fuyu.inputs import (
    HF_IMAGE_BOX_HW,
    IGNORE_INDEX,
    NUM_CHANNELS,
    PATCH_DIM,
    PATCH_SIZE,
    PackedBatch,
    normalize_patches,
)
from otterhd_ray.models.fuyu.model import FuyuForCausalLM, new_model, projection

__all__ = [
    "FLAVOURS",
    "HF_IMAGE_BOX_HW",
    "IGNORE_INDEX",
    "NUM_CHANNELS",
    "PATCH_DIM",
    "PATCH_SIZE",
    "FuyuForCausalLM",
    "FuyuModelConfig",
    "PackedBatch",
    "SamplingParams",
    "build_model",
    "config_for_tokenizer",
    "flavour_config",
    "load_hf",
    "new_model",
    "normalize_patches",
    "prefix_groups",
    "projection",
    "save_hf",
    "stream_generate",
]
