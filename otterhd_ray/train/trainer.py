"""`run_finetune(cfg)`: connect to (or start) Ray, build the `TorchTrainer`, fit, export.

Ray Train V2 (Ray 2.60) semantics: a run is identified by `RunConfig(storage_path, name)`; running again with the
same pair resumes from its latest checkpoint (`ray.train.get_checkpoint()` in the loop), and
`FailureConfig(max_failures)` restarts the worker group from the latest checkpoint after a worker dies.

Connecting: `cfg.ray.address`, else `RAY_ADDRESS` (set by `ray job submit`), else a local Ray is started with
more logical CPUs than the workers reserve — on a 2-core machine, workers holding every CPU starve the pipeline's
Ray Data tasks forever (ray#44687).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from otterhd_ray.config import FinetuneConfig
from otterhd_ray.data.checks import preflight

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
    return cfg


def prepare_demo_data(cfg: FinetuneConfig) -> None:
    """`train.demo_data`: synthesise the shards and the tiny tokenizer the demo config points at, if missing."""
    if not cfg.data.datasets or not cfg.data.tokenizer_path:
        raise ValueError("train.demo_data needs data.datasets[0].path and data.tokenizer_path")
    train_dir = Path(cfg.data.datasets[0].path)
    if train_dir.name != "train":
        raise ValueError(f"train.demo_data: data.datasets[0].path must end in /train (got {train_dir})")
    if not train_dir.is_dir() or not any(train_dir.glob("*.parquet")):
        from otterhd_ray.data.synth import synthesize

        n = cfg.data.datasets[0].num_samples
        logger.info("demo: synthesising %s training samples into %s", n if n > 0 else 64, train_dir)
        synthesize(train_dir.parent, num_train=n if n > 0 else 64, num_bench=0, seed=cfg.data.seed)
    tok = Path(cfg.data.tokenizer_path)
    if not (tok / "tokenizer.json").is_file():
        from otterhd_ray.data.tokenizer import build_tiny_tokenizer

        build_tiny_tokenizer(tok)


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


def connect_ray(cfg: FinetuneConfig) -> None:
    """Join `ray.address` / `RAY_ADDRESS`, or start a local Ray sized so the data tasks always get a CPU."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    reserved = max(cfg.ray.num_workers, 1) * cfg.ray.cpus_per_worker
    num_cpus = max(os.cpu_count() or 1, math.ceil(reserved) + 2)
    ray.init(num_cpus=num_cpus, include_dashboard=False)


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


def run_finetune(cfg: FinetuneConfig, loop_extras: dict[str, Any] | None = None) -> Any:
    """Fine-tune as configured; returns Ray's `Result` (`.checkpoint`, `.metrics`, `.error`).

    `ray.num_workers: 0` runs the loop in this process without Ray Train (debugging); checkpoints then go to
    `storage_path/name/checkpoint_<step>`. `loop_extras` are passed to the loop as is (tests' fault injection).
    """
    cfg = resolve_paths(cfg)
    if cfg.train.demo_data:
        prepare_demo_data(cfg)
    check_inputs(cfg)
    cfg = preflight(cfg, world_size=max(cfg.ray.num_workers, 1))  # bad files / no usable rows: one line, now
    loop_config = {"config": cfg.model_dump(mode="json"), "run_id": f"{cfg.ray.name}", **(loop_extras or {})}
    started = time.perf_counter()
    if cfg.ray.num_workers == 0:
        result = _run_in_process(cfg, loop_config)
    else:
        connect_ray(cfg)
        result = build_trainer(cfg, loop_config).fit()
    logger.info("fine-tune finished in %.1f s; checkpoint %s", time.perf_counter() - started,
                getattr(result.checkpoint, "path", None))
    if cfg.train.save_hf_model and result.checkpoint is not None:
        export_dir = Path(cfg.train.output_dir) / "hf"
        from otterhd_ray.export import export_checkpoint

        with result.checkpoint.as_directory() as directory:
            export_checkpoint(directory, export_dir)
            if cfg.lora.enabled:  # the merged model above, and the adapter alone in PEFT format
                export_checkpoint(directory, Path(cfg.train.output_dir) / "adapter", adapter_only=True)
        logger.info("exported the final checkpoint to %s", export_dir)
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
