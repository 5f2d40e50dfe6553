"""Training metrics: on-device accumulation, one host read every `log_every_steps`, three sinks.

Sinks (rank 0 only, so numbers are not counted `world_size` times): wandb (offline unless `wandb.mode:
online`), `ray.util.metrics` gauges/counters (exported to Prometheus by every Ray node), and a log line with
progress and ETA. Values are global: the window's accumulators are all-reduced across ranks at log time, which
is also the only host-device sync of the loop.

MFU here is *model* FLOPs utilisation: `6 * N_matmul + 6 * L * D * mean_seq` FLOPs per token (forward +
backward; causal attention counted at half of `12 * L * D * s`), divided by the device's dense bf16 peak.
Embedding lookups are not matmuls and are excluded; the patch projection and lm_head are included.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("otterhd_ray.train")

# Dense bf16 peaks (TFLOP/s) from the vendors' data sheets, matched in order against the device name (so the
# PCIe H100 is found before the SXM one); MFU is omitted on devices not listed (and on CPU).
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def flops_per_token(model: torch.nn.Module, mean_seq_len: float) -> float:
    """Training FLOPs per token (see the module docstring)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    # ZeRO-3 leaves each rank an empty 1-D shard; DeepSpeed keeps the full shape in `ds_shape`.
    shapes = [(id(p), tuple(getattr(p, "ds_shape", p.shape)), p.requires_grad) for p in model.parameters()]
    matmuls = [(math.prod(shape), grad) for pid, shape, grad in shapes if len(shape) >= 2 and pid not in embeddings]
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_layers", 0)
    hidden = getattr(cfg, "hidden_size", 0)
    # A frozen weight (the base under LoRA) costs forward + input gradient (4 per parameter), no weight gradient.
    return sum((6.0 if grad else 4.0) * n for n, grad in matmuls) + 6.0 * layers * hidden * mean_seq_len


@dataclass(frozen=True)
class MicroCounts:
    """One micro-batch's counts, computed on the host from the batch before its device copy (no device read)."""

    target_tokens: int  # supervised tokens (the loss normaliser)
    tokens: int  # packed tokens, a filler's included
    samples: int  # real samples (0 for a filler)
    seq_sq: float  # sum of squared sample lengths: the attention term of the FLOP count


@dataclass(frozen=True)
class WindowSums:
    """A window's sums, named: the slots of the one float64 vector that is all-reduced and read at log time."""

    loss_sum: float = 0.0
    target_tokens: float = 0.0
    tokens: float = 0.0
    samples: float = 0.0
    seq_sq: float = 0.0
    grad_norm_sum: float = 0.0
    steps: float = 0.0


WINDOW_FIELDS = tuple(f.name for f in dataclasses.fields(WindowSums))
_SLOT = {name: i for i, name in enumerate(WINDOW_FIELDS)}
_HOST_FIELDS = tuple(f.name for f in dataclasses.fields(MicroCounts))


@dataclass(frozen=True)
class WindowStats:
    """One read window, global over ranks (fillers' tokens included): the log line's and history's values."""

    loss: float
    grad_norm: float
    tokens_per_s: float
    tokens_per_s_per_worker: float
    samples_per_s: float
    target_tokens: float
    tokens: float
    samples: float
    mean_seq_sq: float  # feeds the MFU attention term; not logged itself
    data_wait_fraction: float
    window_s: float

    @classmethod
    def from_sums(cls, sums: WindowSums, elapsed_s: float, data_wait_s: float, world_size: int) -> WindowStats:
        elapsed_s = max(elapsed_s, 1e-9)
        return cls(
            loss=sums.loss_sum / max(sums.target_tokens, 1.0),
            # grad norm is the same on every rank; the sum counted it world_size times
            grad_norm=sums.grad_norm_sum / max(sums.steps, 1.0) / (world_size if world_size > 1 else 1),
            tokens_per_s=sums.tokens / elapsed_s,
            tokens_per_s_per_worker=sums.tokens / elapsed_s / max(world_size, 1),
            samples_per_s=sums.samples / elapsed_s,
            target_tokens=sums.target_tokens,
            tokens=sums.tokens,
            samples=sums.samples,
            mean_seq_sq=sums.seq_sq / max(sums.tokens, 1.0),
            data_wait_fraction=min(1.0, data_wait_s / elapsed_s),
            window_s=elapsed_s,
        )

    def logged(self) -> dict[str, float]:
        """The fields the sinks record, in this order."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "mean_seq_sq"}


class WindowAccumulator:
    """Per-window sums (`WindowSums`): loss and grad norm stay on device, the batches' counts on the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(len(WINDOW_FIELDS), dtype=torch.float64, device=device)
        # Host-side counts are summed on the host and joined with the device sums at read time.
        self._host = [0.0] * len(WINDOW_FIELDS)
        self.data_wait_s = 0.0
        self.started = time.perf_counter()

    def add_micro(self, loss_sum: torch.Tensor, counts: MicroCounts) -> None:
        self.sums[_SLOT["loss_sum"]] += loss_sum.detach().to(torch.float64)
        for name in _HOST_FIELDS:
            self._host[_SLOT[name]] += float(getattr(counts, name))

    def add_step(self, grad_norm: torch.Tensor) -> None:
        self.sums[_SLOT["grad_norm_sum"]] += grad_norm.detach().to(self.device, torch.float64)
        self.sums[_SLOT["steps"]] += 1

    def read(self, world_size: int) -> WindowStats:
        """All-reduce (when distributed) and read: the window's one host sync. Resets the window."""
        sums = self.sums + torch.tensor(self._host, dtype=torch.float64).to(self.device)
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        out = WindowStats.from_sums(
            WindowSums(*sums.tolist()), time.perf_counter() - self.started, self.data_wait_s, world_size
        )
        self.sums.zero_()
        self._host = [0.0] * len(WINDOW_FIELDS)
        self.data_wait_s = 0.0
        self.started = time.perf_counter()
        return out


class MetricsSink:
    """Rank-0 sinks: wandb, Ray metrics, log lines, and a JSONL history (`output_dir/metrics.jsonl`)."""

    def __init__(self, cfg: Any, rank: int, run_id: str, history_path: str | Path | None) -> None:
        self.rank = rank
        self.cfg = cfg
        self._wandb = None
        self._gauges: dict[str, Any] = {}
        self._counters: dict[str, Any] = {}
        self._eval_gauge: Any = None
        self._history = Path(history_path) if history_path and rank == 0 else None
        self._first_log: tuple[float, int] | None = None  # (time, step) of the first logged window
        if rank != 0:
            return
        if self._history is not None:
            self._history.parent.mkdir(parents=True, exist_ok=True)
        if cfg.wandb.enabled:
            self._init_wandb(run_id)
        self._init_ray_metrics()

    def _init_wandb(self, run_id: str) -> None:
        import wandb

        w = self.cfg.wandb
        # A fixed id + resume="allow": a restarted or resumed run appends to the same wandb run.
        self._wandb = wandb.init(
            project=w.project, entity=w.entity, name=w.run_name or self.cfg.ray.name, id=run_id,
            resume="allow", mode=w.mode, dir=self.cfg.train.output_dir, config=self.cfg.model_dump(mode="json"),
        )

    def _init_ray_metrics(self) -> None:
        try:
            import ray
            from ray.util.metrics import Counter, Gauge
        except ImportError:
            return
        if not ray.is_initialized():
            return  # plain pytest: no Ray, no Prometheus export
        tags = ("run",)
        for name in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "data_wait_fraction", "step"):
            self._gauges[name] = Gauge(f"otterhd_train_{name}", description=f"training {name}", tag_keys=tags)
        for name in ("tokens", "samples"):
            self._counters[name] = Counter(f"otterhd_train_{name}_total", description=f"{name} trained", tag_keys=tags)
        self._eval_gauge = Gauge(
            "otterhd_train_eval_score", description="in-training evaluation score (train/evaluation.py)",
            tag_keys=("run", "benchmark", "metric"),
        )

    def log(self, metrics: dict[str, Any], total_steps: int) -> None:
        if self.rank != 0:
            return
        tags = {"run": self.cfg.ray.name}
        for name, gauge in self._gauges.items():
            if metrics.get(name) is not None:
                gauge.set(float(metrics[name]), tags=tags)
        for name, counter in self._counters.items():
            if metrics.get(name):
                counter.inc(float(metrics[name]), tags=tags)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in metrics.items() if isinstance(v, int | float)},
                            step=int(metrics["step"]))
        if self._history is not None:
            with self._history.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        logger.info(self.format_line(metrics, total_steps))

    def log_eval(self, record: dict[str, Any]) -> None:
        """One in-training evaluation (`train/evaluation.py`, which writes its own history and log line): its
        `eval/<benchmark>/<metric>` scores to wandb and to the `otterhd_train_eval_score` gauge."""
        if self.rank != 0:
            return
        bench = str(record.get("eval/benchmark", ""))
        scores = {k: v for k, v in record.items() if k.startswith("eval/") and isinstance(v, int | float)}
        if self._eval_gauge is not None:
            for key, value in scores.items():
                if key.startswith(f"eval/{bench}/"):
                    tags = {"run": self.cfg.ray.name, "benchmark": bench, "metric": key.rsplit("/", 1)[1]}
                    self._eval_gauge.set(float(value), tags=tags)
        if self._wandb is not None:
            self._wandb.log(scores, step=int(record["step"]))

    def format_line(self, m: dict[str, Any], total_steps: int) -> str:
        step, now = int(m["step"]), time.perf_counter()
        # The pace since the first logged window: time before it (Ray / DeepSpeed start-up, the first batch's
        # pipeline start) is not training pace, and counting it made the first ETAs far too long.
        if self._first_log is None:
            self._first_log = (now, step)
        t0, s0 = self._first_log
        eta = dt.timedelta(seconds=int((now - t0) / (step - s0) * (total_steps - step))) if step > s0 else "?"
        mfu = f" mfu {100 * m['mfu']:.1f}%" if m.get("mfu") is not None else ""
        mem = f" mem {m['peak_memory_gib']:.1f}GiB" if m.get("peak_memory_gib") is not None else ""
        return (
            f"step {step}/{total_steps} ({100 * step / max(total_steps, 1):.1f}%) epoch {m['epoch'] + 1} "
            f"loss {m['loss']:.4f} lr {m['lr']:.3e} gnorm {m['grad_norm']:.3f} "
            f"tok/s {m['tokens_per_s']:.0f} samples/s {m['samples_per_s']:.2f}{mfu}{mem} "
            f"data-wait {100 * m['data_wait_fraction']:.1f}% eta {eta}"
        )

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
