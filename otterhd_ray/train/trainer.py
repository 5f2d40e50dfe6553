"""`run_finetune(cfg)`: connect to (or start) Ray, build the `TorchTrainer`, fit.

Ray Train V2 (Ray 2.60) semantics: a run is identified by `RunConfig(storage_path, name)`; running again with the
same pair resumes from its latest checkpoint (`ray.train.get_checkpoint()` in the loop), and
`FailureConfig(max_failures)` restarts the worker group from the latest checkpoint after a worker dies.

Connecting: `otterhd_ray.raycluster.connect` (`cfg.ray.address`, else `RAY_ADDRESS`, else a local Ray with
CPUs to spare beyond the workers' for the pipeline's Ray Data tasks).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from otterhd_ray.config import FinetuneConfig
from otterhd_ray.data.checks import preflight
from otterhd_ray.raycluster import connect

logger = logging.getLogger("otterhd_ray.train")

_REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "az://")


def _absolute(path: str) -> str:
    """Local paths made absolute on the driver: workers do not share its working directory."""
    return path if path.startswith(_REMOTE_PREFIXES) else str(Path(path).expanduser().resolve())


def resolve_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """A copy of `cfg` with every local path absolute (storage, output, data, tokenizer, model, rejects)."""
    cfg = cfg.model_copy(deep=True)
    cfg.ray.storage_path = _absolute(cfg.ray.storage_path)
    cfg.train.output_dir = _absolute(cfg.train.output_dir)
    for spec in cfg.data.datasets:
        spec.path = _absolute(spec.path)
    for section, key in ((cfg.data, "tokenizer_path"), (cfg.model, "path"), (cfg.data, "rejects_path"),
                         (cfg.data, "index_cache_dir"), (cfg.lora, "init_from")):
        if getattr(section, key):
            setattr(section, key, _absolute(getattr(section, key)))
    path = cfg.eval.data_path if cfg.eval is not None else ""
    if path and (Path(path).expanduser().exists() or path.startswith((".", "~")) or path.count("/") != 1):
        cfg.eval.data_path = _absolute(path)  # a hub id (owner/name, not a local dir) stays as it is
    return cfg


def check_inputs(cfg: FinetuneConfig) -> None:
    """Fail on the driver, with the key named, before any worker starts."""
    if not cfg.data.datasets:
        raise ValueError("data.datasets is empty: nothing to train on")
    for spec in cfg.data.datasets:
        if not spec.path.startswith(_REMOTE_PREFIXES) and not Path(spec.path).exists():
            raise ValueError(f"data.datasets[{spec.name}].path does not exist: {spec.path}")
    tok = cfg.data.tokenizer_path
    if not tok:
        raise ValueError("set data.tokenizer_path (or model.path): the pipeline and the model need the tokenizer")
    if not tok.startswith(_REMOTE_PREFIXES) and not Path(tok).is_dir():
        raise ValueError(f"data.tokenizer_path is not a directory: {tok}")
    if cfg.ray.use_gpu and cfg.ray.gpus_per_worker <= 0:
        raise ValueError("ray.use_gpu needs ray.gpus_per_worker > 0")
    if cfg.eval is not None:
        from otterhd_ray.train.evaluation import load_items

        load_items(cfg.eval)  # a wrong benchmark, path or split: one line now, not from every worker later


def build_trainer(cfg: FinetuneConfig, loop_config: dict[str, Any]) -> Any:
    """The `TorchTrainer` for `cfg` (gloo on CPU, NCCL on GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from otterhd_ray.train.loop import train_loop_per_worker

    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = cfg.ray.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.ray.name,
            storage_path=cfg.ray.storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep),
        ),
    )


def run_finetune(cfg: FinetuneConfig) -> Any:
    """Fine-tune as configured; returns Ray's `Result` (`.checkpoint`, `.metrics`, `.error`).

    `ray.num_workers: 0` runs the loop in this process without Ray Train (debugging); checkpoints then go to
    `storage_path/name/checkpoint_<step>`. Training only: the entry point `otterhd_ray.finetune.finetune`
    adds `train.demo_data` before and the `train.save_hf_model` export after (export reads train's
    checkpoints, so train does not call it).
    """
    cfg = resolve_paths(cfg)
    check_inputs(cfg)
    cfg = preflight(cfg, world_size=max(cfg.ray.num_workers, 1))  # bad files / no usable rows: one line, now
    loop_config = {"config": cfg.model_dump(mode="json")}
    started = time.perf_counter()
    if cfg.ray.num_workers == 0:
        result = _run_in_process(cfg, loop_config)
    else:
        connect(cfg.ray.address, reserved_cpus=max(cfg.ray.num_workers, 1) * cfg.ray.cpus_per_worker)
        result = build_trainer(cfg, loop_config).fit()
    logger.info("fine-tune finished in %.1f s; checkpoint %s", time.perf_counter() - started,
                getattr(result.checkpoint, "path", None))
    return result


class _LocalResult:
    """The part of Ray's `Result` that callers use, for the in-process path."""

    def __init__(self, metrics: dict[str, Any], checkpoint: Any) -> None:
        self.metrics, self.checkpoint, self.error = metrics, checkpoint, None


def _run_in_process(cfg: FinetuneConfig, loop_config: dict[str, Any]) -> _LocalResult:
    from ray.train import Checkpoint

    from otterhd_ray.train.loop import LocalContext, train_loop_per_worker

    root = Path(cfg.ray.storage_path) / cfg.ray.name
    existing = sorted(root.glob("checkpoint_*"))
    ctx = LocalContext(root, resume_from=existing[-1] if existing else None)
    metrics = train_loop_per_worker(loop_config, ctx)
    latest = ctx.checkpoints[-1] if ctx.checkpoints else (existing[-1] if existing else None)
    return _LocalResult(metrics, Checkpoint.from_directory(str(latest)) if latest else None)
