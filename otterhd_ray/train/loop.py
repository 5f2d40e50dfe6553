"""`train_loop_per_worker`: the training loop, written against a small context + engine + data-source interface.

The same function runs inside a Ray Train worker (`RayContext`: ranks, `ray.train.report`, `get_checkpoint`) and
in plain pytest (`LocalContext`: one process, checkpoints in a local directory), so the loop's logic is tested
without a cluster.

One optimizer step = up to `gradient_accumulation_steps` packed micro-batches per rank. The step's loss is
`sum of token CE over every rank and micro-batch / supervised tokens of the whole step` (docs/internals.md): each
rank sums its micro-batches' target counts on the host, one all-reduce of that count per step (a collective, not
a host sync), and every micro-batch's backward uses `loss_sum * world_size / step_tokens` — the data-parallel
gradient mean divides by `world_size` again. The last step of an epoch may have fewer micro-batches (no data is
dropped; the seed's "epoch" stopped half-way).

Reporting: metrics go to the sinks of `metrics.py` (log line, JSONL history, wandb, Prometheus) every
`log_every_steps`; `ray.train.report` is called only with a checkpoint. Each Train V2 report waits for the
controller's next poll (a 1-slot queue, ~2 s), so reporting metrics every few steps would stall fast steps.

Host syncs: none per step. The window accumulators (`metrics.py`) are read every `log_every_steps`; the only
other reads are ints the packer computed on the host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from otterhd_ray.config import FaultsConfig, FinetuneConfig
from otterhd_ray.train.checkpoint import (
    LORA_BASE_DIR,
    MODEL_CONFIG_FILE,
    TrainState,
    load_training_checkpoint,
    save_training_checkpoint,
)
from otterhd_ray.train.engine import Engine, build_engine
from otterhd_ray.train.evaluation import build_evaluator
from otterhd_ray.train.metrics import MetricsSink, MicroCounts, WindowAccumulator, flops_per_token, peak_flops

if TYPE_CHECKING:
    from otterhd_ray.data.pipeline import MicroBatch

logger = logging.getLogger("otterhd_ray.train")


# ------------------------------------------------------------------------------------------- interfaces
class DataSource(Protocol):
    """Per-rank packed micro-batches. Every rank must get the same count per epoch (collectives hang else)."""

    def num_micro_batches(self, epoch: int) -> int: ...

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[MicroBatch]:
        """Micro-batches of `epoch` from position `start` on (a resumed run skips the consumed ones)."""
        ...


class TrainContext(Protocol):
    rank: int
    local_rank: int
    world_size: int

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...


class RayContext:
    """Ray Train V2: ranks from the train context, reports and checkpoints through `ray.train`."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        with contextlib.suppress(Exception):  # the pipeline's per-epoch Ray Data progress bars flood job logs
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
        self.rank = ctx.get_world_rank()
        self.local_rank = ctx.get_local_rank()
        self.world_size = ctx.get_world_size()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None:
            # Train V2 hands a report to the controller through a 1-slot queue polled every ~2 s: a worker that
            # dies before the poll loses its report, and the checkpoint is never registered (so a restart would
            # go back further). Waiting for the commit makes "reported" mean "resumable".
            from ray.train import CheckpointConsistencyMode

            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory


class LocalContext:
    """Single process, no Ray: checkpoints are copied to `root/checkpoint_<step>`; reports kept in a list."""

    def __init__(self, root: str | Path, resume_from: str | Path | None = None) -> None:
        self.rank, self.local_rank, self.world_size = 0, 0, 1
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[Path] = []
        self._resume_from = Path(resume_from) if resume_from else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            dst = self.root / f"checkpoint_{int(metrics['step']):06d}"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(checkpoint_dir, dst)
            self.checkpoints.append(dst)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        yield str(self._resume_from) if self._resume_from else None


# ---------------------------------------------------------------------------------------------- set-up
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device(cfg: FinetuneConfig, local_rank: int) -> torch.device:
    if cfg.ray.use_gpu:
        if not torch.cuda.is_available():
            raise ValueError("ray.use_gpu is true but this worker sees no CUDA device")
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def build_model_for(cfg: FinetuneConfig, device: torch.device) -> torch.nn.Module:
    """The Fuyu model of `cfg.model` on `device` (bf16 for DeepSpeed bf16 runs, else fp32)."""
    from otterhd_ray.models.fuyu import build_model
    from otterhd_ray.train.deepspeed import resolve_precision

    tokenizer = None
    if cfg.data.tokenizer_path:
        from otterhd_ray.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    precision = resolve_precision(cfg.train.precision, device.type == "cuda")
    # DeepSpeed bf16 keeps fp32 masters in the optimizer, so the module itself is bf16; the plain torch engine
    # keeps fp32 weights and autocasts instead (AdamW on bf16 weights would lose small updates).
    dtype = torch.bfloat16 if precision == "bf16" and cfg.deepspeed.enabled else torch.float32
    model = build_model(cfg.model, dtype=dtype, device=device, tokenizer=tokenizer)
    if cfg.lora.enabled:
        from otterhd_ray.models.fuyu.peft import apply_lora_config

        apply_lora_config(model, cfg.lora)  # base frozen: only the adapters reach the optimizer
    return model


class PipelineSource:
    """`DataSource` over `otterhd_ray.data.pipeline`: one epoch schedule computed per epoch and reused."""

    def __init__(self, cfg: FinetuneConfig, rank: int, world_size: int) -> None:
        if not cfg.data.tokenizer_path:
            raise ValueError("set data.tokenizer_path (or model.path): the pipeline tokenizes with it")
        if not cfg.data.datasets:
            raise ValueError("data.datasets is empty: nothing to train on")
        self.cfg, self.rank, self.world_size = cfg.data, rank, world_size
        self.tokenizer_dir = cfg.data.tokenizer_path
        self._schedules: dict[int, Any] = {}

    def _schedule(self, epoch: int) -> Any:
        from otterhd_ray.data.pipeline import schedule_epoch

        if epoch not in self._schedules:
            self._schedules = {epoch: schedule_epoch(self.cfg, self.tokenizer_dir, epoch, self.world_size)}
        return self._schedules[epoch]

    def num_micro_batches(self, epoch: int) -> int:
        from otterhd_ray.data.pipeline import epoch_num_micro_batches

        if epoch in self._schedules:
            return int(self._schedules[epoch].per_rank)
        return int(epoch_num_micro_batches(self.cfg, self.tokenizer_dir, self.world_size, epoch))

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[MicroBatch]:
        from otterhd_ray.data.pipeline import build_train_iterator

        it = build_train_iterator(
            self.cfg, self.tokenizer_dir, self.rank, self.world_size, epoch, start_position=start,
            schedule=self._schedule(epoch),
        )
        return iter(it)


def build_data_source(cfg: FinetuneConfig, rank: int, world_size: int) -> DataSource:
    """The data pipeline's per-rank source (`otterhd_ray.data.pipeline`)."""
    return PipelineSource(cfg, rank, world_size)


def plan_steps(cfg: FinetuneConfig, data: DataSource) -> list[int]:
    """Optimizer steps of each epoch: ceil(micro-batches / accumulation), so no micro-batch is dropped."""
    gas = cfg.train.gradient_accumulation_steps
    steps = []
    for epoch in range(cfg.train.epochs):
        n = data.num_micro_batches(epoch)
        if n <= 0:
            raise ValueError(f"epoch {epoch} has no micro-batches: no usable data for {cfg.ray.num_workers} workers")
        steps.append(math.ceil(n / gas))
    return steps


# ------------------------------------------------------------------------------------------------- loop
class _Faults:
    """`faults:` of the config (tests): SIGKILL one worker once at a step (the marker file makes it once), or
    raise `InjectedStop` after a step."""

    def __init__(self, faults: FaultsConfig, rank: int) -> None:
        self.cfg = faults
        self.kill_here = faults.fail_at_step is not None and rank == faults.fail_rank

    def maybe_die(self, step: int) -> None:
        marker = self.cfg.fail_marker
        if self.kill_here and step == self.cfg.fail_at_step and marker and not Path(marker).exists():
            Path(marker).write_text(f"killed at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_stop(self, step: int) -> None:
        """Crash (an exception) right after step `step` was reported, as a killed job would."""
        if step == self.cfg.stop_after_step:
            raise InjectedStop(f"stopped after step {step} (faults.stop_after_step)")


class InjectedStop(RuntimeError):
    pass


ModelFactory = Callable[[FinetuneConfig, torch.device], torch.nn.Module]
DataSourceFactory = Callable[[FinetuneConfig, int, int], DataSource]


def train_loop_per_worker(
    loop_config: dict[str, Any],
    ctx: TrainContext | None = None,
    *,
    model_factory: ModelFactory | None = None,
    data_source_factory: DataSourceFactory | None = None,
) -> dict[str, Any]:
    """Entry point of each training worker; returns the last logged metrics.

    `loop_config` is Ray Train's `train_loop_config`: exactly `{"config": FinetuneConfig dump}` (fault injection
    is the config's typed `faults:` section). The keywords are for in-process tests and benchmarks (Ray Train
    calls the loop with the dict only): another model or data source than the config's.
    """
    unknown = set(loop_config) - {"config"}
    if unknown:
        raise ValueError(f"train_loop_config has unknown keys {sorted(unknown)}; fault injection is `faults:`")
    cfg = FinetuneConfig.model_validate(loop_config["config"])
    ctx = ctx or RayContext()
    rank, world = ctx.rank, ctx.world_size
    device = _device(cfg, ctx.local_rank)

    # The same seed on every rank for the initial weights (DeepSpeed broadcasts rank 0's anyway; this keeps a
    # ZeRO-3 or torch run correct without relying on it), then a per-rank stream for everything else.
    _seed_everything(cfg.train.seed)
    model = (model_factory or build_model_for)(cfg, device)
    base_dirs = _random_base_snapshot(cfg, model, rank)
    _seed_everything(cfg.train.seed + 1000 * (rank + 1))
    data = (data_source_factory or build_data_source)(cfg, rank, world)
    steps_per_epoch = plan_steps(cfg, data)
    total_steps = sum(steps_per_epoch)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    engine = build_engine(model, cfg, total_steps, device, world)

    state = TrainState(total_steps=total_steps, world_size=world)
    with ctx.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is not None:
            state = load_training_checkpoint(ckpt_dir, engine, rank, world)
            logger.info("rank %d resumed from %s at step %d (epoch %d, micro-batch %d)",
                        rank, ckpt_dir, state.global_step, state.epoch, state.micro_batch)
    if state.total_steps != total_steps:
        raise ValueError(
            f"the checkpoint's run had {state.total_steps} optimizer steps, this config gives {total_steps}: "
            "resume with the same data, epochs, accumulation and workers"
        )
    if state.global_step >= total_steps and rank == 0:
        # Rerunning a finished run is allowed (a no-op), but a user who changed something else expects training
        logger.warning("run %r already finished its %d optimizer steps (checkpoint in %s): nothing to train; "
                       "a new ray.name (or another ray.storage_path) starts a new run",
                       cfg.ray.name, total_steps, cfg.ray.storage_path)
    return _run(cfg, ctx, engine, data, state, device, base_dirs)


def _random_base_snapshot(cfg: FinetuneConfig, model: torch.nn.Module, rank: int) -> dict[str, Path]:
    """LoRA on a randomly initialised base (no model.path: the demo, CI): the base has no other home, so it is
    written once here (before any engine converts or partitions it) and copied into every checkpoint as `base/`,
    which export needs to merge. With model.path a checkpoint holds the adapters only."""
    if not cfg.lora.enabled or cfg.model.path or getattr(model, "lora_spec", None) is None:
        return {}
    from otterhd_ray.models.fuyu.hf import save_hf

    base = Path(cfg.train.output_dir) / "lora_base"
    if rank == 0:
        save_hf(model, base, base_only=True)
    return {LORA_BASE_DIR: base}


def _run(
    cfg: FinetuneConfig,
    ctx: TrainContext,
    engine: Engine,
    data: DataSource,
    state: TrainState,
    device: torch.device,
    base_dirs: dict[str, Path] | None = None,
) -> dict[str, Any]:
    rank, world, gas = ctx.rank, ctx.world_size, cfg.train.gradient_accumulation_steps
    total = state.total_steps
    metrics_path = Path(cfg.train.output_dir) / "metrics.jsonl"
    # Read before the sink and the ledger open (append) their files: this start's number in them.
    attempt = max(next_attempt(metrics_path) if rank == 0 else 0, next_attempt(_SampleLedger.path(cfg, rank)))
    sink = MetricsSink(cfg, rank, cfg.ray.name, metrics_path)
    window = WindowAccumulator(device)
    faults = _Faults(cfg.faults, rank)
    ledger = _SampleLedger(cfg, rank, attempt)
    config_json = cfg.model_dump_json(indent=2)
    extra_files = {}
    if hasattr(getattr(engine.model, "config", None), "to_hf_dict"):
        extra_files[MODEL_CONFIG_FILE] = json.dumps(engine.model.config.to_hf_dict(), indent=2)
    flops_tok, peak = flops_per_token(engine.model, 1.0), peak_flops(device)
    resumed_from = state.global_step
    evaluator = build_evaluator(cfg, engine, rank, world, sink, resumed_from)  # `eval:`; a no-op without it
    last: dict[str, Any] = {}

    def checkpoint_and_report(metrics: dict[str, Any]) -> None:
        # Staged next to the outputs, not in /tmp: an 8B ZeRO checkpoint is tens of GB per node.
        staging = Path(cfg.train.output_dir) / ".checkpoint_staging"
        staging.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"step{state.global_step}_rank{rank}_", dir=staging)
        try:
            save_training_checkpoint(
                tmp, engine, state, rank, config_json, cfg.data.tokenizer_path, extra_files, base_dirs
            )
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank's files are written before any report
            ctx.report(metrics, checkpoint_dir=tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    every = cfg.train.checkpoint_every_steps
    while state.global_step < total:
        epoch = state.epoch
        num_micro = data.num_micro_batches(epoch)
        batches = data.iter_epoch(epoch, start=state.micro_batch)
        while state.epoch == epoch and state.global_step < total:
            k = min(gas, num_micro - state.micro_batch)
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(k)]
            window.data_wait_s += time.perf_counter() - t0
            _train_step(engine, micro, window, world, device)
            ledger.write(state, micro)
            state.global_step += 1
            state.micro_batch += k
            if state.micro_batch >= num_micro:  # a checkpoint taken now must resume at the next epoch
                state.epoch, state.micro_batch = epoch + 1, 0
            faults.maybe_die(state.global_step)
            evaluated = evaluator.after_step(state, epoch, window)  # before the checkpoint: its report carries it

            at_end = state.global_step >= total and cfg.train.checkpoint_at_end
            want_ckpt = at_end or bool(every and state.global_step % every == 0)
            if want_ckpt or state.global_step % cfg.train.log_every_steps == 0:
                last = _window_metrics(window, engine, state, world, flops_tok, peak, resumed_from, epoch)
                last["attempt"] = attempt
                sink.log(last, total)
                if want_ckpt:
                    checkpoint_and_report({**last, **evaluated})
            if evaluated and not want_ckpt:
                ctx.report(evaluated)  # every rank, like checkpoint reports (Train V2 reports are a barrier)
            faults.maybe_stop(state.global_step)
    ledger.close()
    sink.close()
    if rank == 0:
        write_loss_png(Path(cfg.train.output_dir) / "metrics.jsonl", cfg.ray.name)
    return last


def write_loss_png(metrics_path: Path, run_name: str) -> None:
    """loss.png beside the metrics file; a figure that cannot be drawn is a warning, never a failed run."""
    try:
        from otterhd_ray.plots import plot_training

        if metrics_path.is_file():
            logger.info("training curves: %s", plot_training(metrics_path, run_name=run_name))
    except Exception as err:  # noqa: BLE001 (matplotlib missing, a full disk: the trained model still counts)
        logger.warning("no loss.png (%s: %s); `otterhd plot %s` retries", type(err).__name__, err, metrics_path.parent)


def _train_step(
    engine: Engine, micro: list[MicroBatch], window: WindowAccumulator, world: int, device: torch.device
) -> None:
    local_tokens = sum(_target_tokens(mb) for mb in micro)
    step_tokens = torch.tensor(float(local_tokens), device=device)
    if world > 1:
        torch.distributed.all_reduce(step_tokens)
    scale = world / step_tokens.clamp_min(1.0)
    for i, mb in enumerate(micro):
        counts = _host_counts(mb)  # before the device copy: host tensors, no sync
        loss_sum, _ = engine.forward(mb.packed.to(device, non_blocking=True))
        engine.backward(loss_sum * scale.to(loss_sum.dtype), is_boundary=i == len(micro) - 1)
        window.add_micro(loss_sum, counts)
    window.add_step(engine.step())


def _target_tokens(mb: MicroBatch) -> int:
    if mb.packed.num_target_tokens is None:  # the pipeline always counts; a data source must too
        raise ValueError(f"micro-batch {mb.position} of epoch {mb.epoch} has no num_target_tokens")
    return mb.packed.num_target_tokens


def _host_counts(mb: MicroBatch) -> MicroCounts:
    cu = mb.packed.cu_seqlens
    lengths = (cu[1:] - cu[:-1]).to(torch.float64)
    return MicroCounts(target_tokens=_target_tokens(mb), tokens=mb.packed.num_tokens, samples=mb.num_samples,
                       seq_sq=float((lengths * lengths).sum()))


def _window_metrics(
    window: WindowAccumulator, engine: Engine, state: TrainState, world: int, flops_tok: float,
    peak: float | None, resumed_from: int, epoch: int,
) -> dict[str, Any]:
    m = window.read(world)
    # Global counts (all ranks, fillers' tokens included); every rank reads the same all-reduced window.
    state.samples_seen += int(m.samples)
    state.tokens_seen += int(m.tokens)
    # flops_tok was computed for seq len 1; add the attention term for this window's mean sample length.
    cfg = getattr(engine.model, "config", None)
    attn = 6.0 * getattr(cfg, "num_layers", 0) * getattr(cfg, "hidden_size", 0) * (m.mean_seq_sq - 1.0)
    mfu = (m.tokens_per_s_per_worker * (flops_tok + max(attn, 0.0)) / peak) if peak else None
    peak_gib = None
    if torch.cuda.is_available() and engine.device.type == "cuda":  # host-side allocator counter: no sync
        peak_gib = torch.cuda.max_memory_allocated(engine.device) / 2**30
    return {
        **m.logged(),
        "mfu": mfu,
        "peak_memory_gib": peak_gib,
        "step": state.global_step,
        "epoch": epoch,
        "lr": engine.lr,
        "samples_seen": state.samples_seen,
        "tokens_seen": state.tokens_seen,
        "resumed_from_step": resumed_from,
        "total_steps": state.total_steps,
    }


def next_attempt(path: Path) -> int:
    """1 + the largest `attempt` in an existing JSONL file (0 for a new one).

    Every start of the loop that appends to a metrics or sample log takes the next number, so steps a restart
    replays (it resumes from the last checkpoint, behind the last logged step) are told apart from the first
    run's records by `attempt`, not guessed from their order. Per file: a restart on another node starts a
    file of its own."""
    if not path.is_file():
        return 0
    last = -1
    with path.open() as f:
        for line in f:
            try:
                last = max(last, int(json.loads(line).get("attempt", 0)))
            except (ValueError, TypeError, AttributeError):  # a torn last line of a killed writer
                continue
    return last + 1


class _SampleLedger:
    """`train.log_samples`: one JSON line per optimizer step with the samples this rank trained on."""

    @staticmethod
    def path(cfg: FinetuneConfig, rank: int) -> Path:
        return Path(cfg.train.output_dir) / "samples" / f"rank{rank}.jsonl"

    def __init__(self, cfg: FinetuneConfig, rank: int, attempt: int = 0) -> None:
        self._file = None
        if cfg.train.log_samples:
            path = self.path(cfg, rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a")
        self.rank, self.attempt = rank, attempt

    def write(self, state: TrainState, micro: list[MicroBatch]) -> None:
        if self._file is None:
            return
        # called before the step's counters advance: `step` is 0-based here, `epoch` the step's own epoch
        indices = [int(i) for mb in micro for i in mb.sample_index.tolist()]
        record = {"step": state.global_step, "epoch": state.epoch, "rank": self.rank, "attempt": self.attempt,
                  "sample_index": indices}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
