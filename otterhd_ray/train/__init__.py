"""Fine-tuning on Ray Train + DeepSpeed: `run_finetune(cfg)` (trainer.py), the worker loop (loop.py), engines
(engine.py), DeepSpeed config (deepspeed.py), schedules and decay groups (schedule.py), checkpoints
(checkpoint.py) and metrics (metrics.py). Heavy imports (ray, deepspeed) stay inside the functions that need them.
"""

from __future__ import annotations

__all__ = ["run_finetune", "train_loop_per_worker"]


def __getattr__(name: str):
    # Lazy: `import otterhd_ray.train` must not import Ray or DeepSpeed.
    if name == "run_finetune":
        from otterhd_ray.train.trainer import run_finetune

        return run_finetune
    if name == "train_loop_per_worker":
        from otterhd_ray.train.loop import train_loop_per_worker

        return train_loop_per_worker
    raise AttributeError(name)
