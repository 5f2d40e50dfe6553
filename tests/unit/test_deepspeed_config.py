"""Our config -> DeepSpeed dict, and the committed finetune configs (the seed's flags, the demo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from otterhd_ray.config import FinetuneConfig, load_finetune_config
from otterhd_ray.train.deepspeed import build_deepspeed_config, resolve_precision

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**sections) -> FinetuneConfig:
    return FinetuneConfig.model_validate(sections)


def test_zero2_defaults_on_cpu_and_gpu():
    cfg = _cfg(train={"gradient_accumulation_steps": 3}, optim={"grad_clip": 0.5, "weight_decay": 0.1})
    cpu = build_deepspeed_config(cfg, world_size=2, use_gpu=False)
    assert cpu["zero_optimization"]["stage"] == 2
    assert cpu["gradient_accumulation_steps"] == 3 and cpu["train_batch_size"] == 6
    assert cpu["train_micro_batch_size_per_gpu"] == 1  # one packed row per micro-batch
    assert cpu["gradient_clipping"] == 0.5
    assert cpu["bf16"] == {"enabled": False} and cpu["fp16"] == {"enabled": False}  # fp32 on CPU
    assert build_deepspeed_config(cfg, world_size=2, use_gpu=True)["bf16"] == {"enabled": True}
    params = cpu["optimizer"]["params"]
    assert cpu["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True
    assert params["weight_decay"] == 0.1 and params["lr"] == cfg.optim.lr
    assert cpu["zero_force_ds_cpu_optimizer"] is False


def test_offload_keys_live_inside_zero_optimization():
    cfg = _cfg(deepspeed={"stage": 3, "offload_optimizer": True, "offload_params": True})
    ds = build_deepspeed_config(cfg, world_size=1, use_gpu=True)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert "offload_optimizer" not in ds and "offload_param" not in ds
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    cpu = build_deepspeed_config(_cfg(deepspeed={"stage": 2, "offload_optimizer": True}), 1, use_gpu=False)
    assert cpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is False
    assert "offload_param" not in cpu["zero_optimization"]


@pytest.mark.parametrize(
    "deepspeed, message",
    [({"stage": 2, "offload_params": True}, "stage: 3"), ({"stage": 0, "offload_optimizer": True}, "stage >= 1")],
)
def test_impossible_offload_is_a_clear_error(deepspeed, message):
    with pytest.raises(ValueError, match=message):
        build_deepspeed_config(_cfg(deepspeed=deepspeed), 1, use_gpu=False)
    with pytest.raises(ValueError):
        build_deepspeed_config(_cfg(), 0, use_gpu=False)


def test_precision_resolution():
    assert resolve_precision("auto", True) == "bf16"
    assert resolve_precision("auto", False) == "fp32"
    assert resolve_precision("bf16", False) == "bf16"
    with pytest.raises(ValueError):
        resolve_precision("fp16", True)


def test_otterhd_8b_config_expresses_the_seed_command():
    cfg = load_finetune_config(ROOT / "configs/finetune/otterhd_8b_zero2.yaml")
    # accelerate_config_zero2.yaml / --num_processes=8
    assert cfg.deepspeed.stage == 2 and cfg.ray.num_workers == 8 and cfg.ray.use_gpu
    assert cfg.train.precision == "bf16"
    # --pretrained_model_name_or_path=adept/fuyu-8b, --model_name=fuyu
    assert cfg.model.flavour == "fuyu-8b" and cfg.model.path
    assert cfg.data.instruction_template == "User:{instruction} Assistant:"  # --instruction_format=fuyu
    assert cfg.data.max_samples_per_batch == 8  # --batch_size=8
    assert cfg.train.gradient_accumulation_steps == 2 and cfg.train.epochs == 3
    assert (cfg.optim.lr, cfg.optim.scheduler, cfg.optim.warmup_ratio, cfg.optim.weight_decay) == (
        1e-5, "linear", 0.01, 0.1)
    assert cfg.optim.grad_clip == 1.0
    # --dynamic_resolution
    assert cfg.data.buckets.mode == "otterhd" and cfg.data.buckets.otterhd_sizes == [448, 512, 768]
    assert cfg.train.save_hf_model  # --save_hf_model
    assert cfg.ray.name == "OtterHD_Tester" and cfg.wandb.run_name == "OtterHD_Tester"  # --run_name
    assert (cfg.wandb.enabled, cfg.wandb.project, cfg.wandb.entity) == (True, "Fuyu", "ntu-slab")
    assert cfg.ray.storage_path == "checkpoints"  # --external_save_dir=./checkpoints
    ds = build_deepspeed_config(cfg, cfg.ray.num_workers, use_gpu=True)
    assert ds["train_batch_size"] == 16 and ds["bf16"]["enabled"]


def test_demo_config_is_cpu_zero2_with_two_workers():
    cfg = load_finetune_config(ROOT / "configs/finetune/demo.yaml")
    assert cfg.model.flavour == "demo" and not cfg.ray.use_gpu and cfg.ray.num_workers == 2
    assert cfg.deepspeed.enabled and cfg.deepspeed.stage == 2 and cfg.deepspeed.torch_adam
    assert resolve_precision(cfg.train.precision, cfg.ray.use_gpu) == "fp32"
    assert cfg.train.demo_data and cfg.train.save_hf_model
    # overrides used by the GPU run keep validating
    gpu = load_finetune_config(ROOT / "configs/finetune/demo.yaml",
                               ["ray.use_gpu=true", "model.flavour=fuyu-8b", "model.num_layers=4",
                                "train.precision=bf16", "ray.num_workers=1"])
    assert build_deepspeed_config(gpu, 1, use_gpu=True)["bf16"]["enabled"]
