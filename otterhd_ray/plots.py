"""PNG figures of a run, from the files it wrote (matplotlib, headless).

- `plot_training(metrics.jsonl, loss.png)`: loss, learning rate, tokens/s and data-wait fraction vs step. Each
  attempt of a restarted run (the `attempt` field) is its own line, so the steps a restart replayed are seen
  as such, not as a zig-zag of one curve.
- `plot_per_kind(metrics.json of an evaluation, per_kind.png)`: multiple-choice accuracy per question kind and
  model, when the evaluation found kinds (a run's `breakdown.question_kinds`, MagnifierBench).
- `plot_run(RUN_DIR)` (`otterhd plot RUN_DIR`): every figure whose input is found under RUN_DIR.

Nothing here imports the rest of the package: the fine-tune and the evaluation call it at their end, and a
figure that cannot be drawn is reported, never fatal to the run that asked for it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
EVAL_METRICS_FILE = "metrics.json"
PER_KIND_PNG = "per_kind.png"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError("matplotlib is not installed (pip install matplotlib): no figures") from err
    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The JSONL records of a metrics file; a torn last line (a killed writer) is skipped, not an error."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


PANELS = (
    ("loss", "training loss"),
    ("lr", "learning rate"),
    ("tokens_per_s", "tokens / s (all workers)"),
    ("data_wait_fraction", "data wait (fraction of step time)"),
)


def plot_training(metrics_path: str | Path, out_png: str | Path | None = None, run_name: str | None = None) -> Path:
    """loss / lr / tokens/s / data wait vs step from a fine-tune's metrics.jsonl; returns the PNG's path. The
    title names `run_name` (the run's `ray.name`), else the metrics file's directory."""
    metrics_path = Path(metrics_path)
    history = read_history(metrics_path)
    if not history:
        raise ValueError(f"{metrics_path}: no metrics records (a run writes one every train.log_every_steps)")
    by_attempt: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in history:
        by_attempt[int(record.get("attempt", 0))].append(record)
    plt = _pyplot()
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 9), sharex=True)
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        for attempt, records in sorted(by_attempt.items()):
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                name = f"attempt {attempt}" if len(by_attempt) > 1 else None
                ax.plot(*zip(*points, strict=True), lw=1.2, marker="." if len(points) < 50 else None, label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if len(by_attempt) > 1:
        axes[0].legend()
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title(f"fine-tune: {run_name or metrics_path.parent.name or metrics_path.parent}")
    fig.tight_layout()
    out = Path(out_png) if out_png else metrics_path.with_name(LOSS_PNG)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _kinds(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return (run.get("breakdown") or {}).get("question_kinds") or {}


def plot_per_kind(eval_metrics: dict[str, Any] | str | Path, out_png: str | Path) -> Path | None:
    """Grouped bars: MC accuracy per question kind (a run's `breakdown.question_kinds`), one bar per run
    (model x dataset). None when no run has kinds."""
    metrics = json.loads(Path(eval_metrics).read_text()) if isinstance(eval_metrics, (str, Path)) else eval_metrics
    runs = [r for r in metrics.get("runs", []) if _kinds(r)]
    if not runs:
        return None
    kinds = list(dict.fromkeys(k for r in runs for k in _kinds(r)))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(kinds) * len(runs) + 2), 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [100 * _kinds(run).get(k, {}).get("accuracy", 0.0) for k in kinds]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(kinds))]
        bars = ax.bar(xs, values, width, label=f"{run['model']} ({run['dataset']})")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(25, color="grey", ls=":", lw=1, label="chance (4 options)")  # MagnifierBench: always A-D
    totals = [_kinds(runs[0]).get(k, {}).get("total", 0) for k in kinds]
    ax.set_xticks(range(len(kinds)), [f"{k}\n(n={n})" for k, n in zip(kinds, totals, strict=True)])
    ax.set_ylabel("multiple-choice accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Every figure whose input is under `run_dir`: loss.png beside each metrics.jsonl, per_kind.png beside
    each evaluation metrics.json that has kinds. Raises `ValueError` when there is nothing to plot."""
    root = Path(run_dir)
    if not root.exists():
        raise ValueError(f"{root} does not exist")
    written = []
    for path in sorted(root.rglob(METRICS_FILE)):
        if read_history(path):
            written.append(plot_training(path))
    for path in sorted(root.rglob(EVAL_METRICS_FILE)):
        try:
            metrics = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(metrics, dict):
            out = plot_per_kind(metrics, path.with_name(PER_KIND_PNG))
            if out:
                written.append(out)
    if not written:
        raise ValueError(f"nothing to plot under {root}: no {METRICS_FILE} with records, no evaluation "
                         f"{EVAL_METRICS_FILE} with per-kind results")
    return written
