"""Our typed config -> the DeepSpeed JSON dict. No DeepSpeed import here (it is imported inside the worker).

Choices that differ from a copy-paste DeepSpeed config, and why:
- `train_micro_batch_size_per_gpu` is 1: a micro-batch is one *packed* row of up to `data.max_tokens` tokens,
  so the sample count per micro-batch varies and DeepSpeed must not rescale anything by it.
- `gradient_accumulation_steps` is the configured value, but the loop marks each boundary itself
  (`set_gradient_accumulation_boundary`) so that an epoch whose micro-batch count is not a multiple of it ends
  with one shorter step instead of dropping data; losses are pre-normalised by the step's supervised-token count
  across ranks, so `backward(scale_wrt_gas=False)` is used.
- The optimizer is DeepSpeed's `AdamW` block built from *our* parameter groups (weight decay only where it
  belongs, see `schedule.py`). `torch_adam: true` makes DeepSpeed use `torch.optim.AdamW` (no JIT build of
  `fused_adam` / `cpu_adam`, needed on CPU); false gives FusedAdam on GPU or DeepSpeedCPUAdam with offload.
- Offload keys live inside `zero_optimization` (DeepSpeed ignores them elsewhere).
"""

from __future__ import annotations

from typing import Any

from otterhd_ray.config import FinetuneConfig


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """`auto` -> bf16 on GPU, fp32 on CPU (CPU bf16 is slow and fp16 is refused by DeepSpeed on CPU)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    return precision


def build_deepspeed_config(cfg: FinetuneConfig, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` on `world_size` data-parallel ranks."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ds = cfg.deepspeed
    if ds.offload_params and ds.stage != 3:
        raise ValueError("deepspeed.offload_params needs deepspeed.stage: 3 (ZeRO-1/2 never partition weights)")
    if ds.offload_optimizer and ds.stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.stage >= 1")
    gas = cfg.train.gradient_accumulation_steps
    precision = resolve_precision(cfg.train.precision, use_gpu)
    optim = cfg.optim

    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 1:
        zero.update(
            # Bucket sizes in elements; 5e8 is DeepSpeed's default and fine for 8B, kept explicit for tuning.
            reduce_bucket_size=int(5e8),
            allgather_bucket_size=int(5e8),
            contiguous_gradients=True,
            overlap_comm=use_gpu,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.stage == 3:
        # Consolidate the 16-bit weights on rank 0 at save time so export needs no zero_to_fp32 pass.
        zero["stage3_gather_16bit_weights_on_model_save"] = True

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": gas,
        "train_batch_size": gas * world_size,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": ds.torch_adam,
            },
        },
        # With offload and a non-DeepSpeed optimizer DeepSpeed refuses unless told; torch AdamW on CPU is fine.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        # Our loop logs; DeepSpeed's own per-step prints would be a host sync and noise.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return config
