"""`otterhd demo`: the whole chain on a laptop-class CPU, on embedded defaults.

    synth data -> input-pipeline statistics -> fine-tune (debug model, local Ray, DeepSpeed ZeRO-2 on gloo)
    -> export to an HF directory -> MagnifierBench-style evaluation on Ray actors -> report

The configs are the committed demo ones (`configs/finetune/demo.yaml`, `configs/benchmark/demo.yaml`), shipped
inside the checkout; their `demo_output/` prefix is replaced by `--workdir`. Without OPENAI_API_KEY the
evaluation uses the rule-based judge, and the report says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from otterhd_ray.config import FinetuneConfig, validate_config

REPO_ROOT = Path(__file__).resolve().parent.parent
FINETUNE_CONFIG = REPO_ROOT / "configs" / "finetune" / "demo.yaml"
BENCHMARK_CONFIG = REPO_ROOT / "configs" / "benchmark" / "demo.yaml"
STEPS = ("data", "finetune", "export", "evaluate")

# The demo's data: the `easy` synthetic level (one large object on a flat background, small frames), every row
# asked in the benchmark's multiple-choice format (answered with the option's text), bad rows to show the reject
# accounting; the benchmark is drawn from another seed (held out). benchmarks/demo_learning.py measured what
# these settings learn.
NUM_TRAIN, NUM_BENCH, NUM_BAD, SEED, BENCH_SEED = 4096, 64, 8, 0, 1
LEVEL, MC_FRACTION = "easy", 1.0
UNTRAINED_DIR = "export_untrained"  # the initial weights of the fine-tune, evaluated beside the fine-tuned model


def _load_with_workdir(path: Path, workdir: Path) -> dict[str, Any]:
    """The YAML at `path` with its `demo_output` paths moved under `workdir`."""
    text = path.read_text().replace("demo_output", str(workdir))
    return yaml.safe_load(text)


def _banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 100 - len(title)), flush=True)


def ensure_tokenizer(tokenizer_dir: str | Path) -> None:
    """The tiny offline tokenizer (`data/tokenizer.py`) at `tokenizer_dir`, unless one is there already."""
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        from otterhd_ray.data.tokenizer import build_tiny_tokenizer

        build_tiny_tokenizer(tokenizer_dir)


def ensure_demo_data(cfg: FinetuneConfig) -> None:
    """`train.demo_data`: synthesise the shards and the tiny tokenizer the config points at, where missing.

    Called by `otterhd_ray.finetune` (so `jobs/finetune.py --config configs/finetune/demo.yaml` works from a
    clean clone), with paths already absolute; the trainer itself never generates data.
    """
    if not cfg.data.datasets or not cfg.data.tokenizer_path:
        raise ValueError("train.demo_data needs data.datasets[0].path and data.tokenizer_path")
    train_dir = Path(cfg.data.datasets[0].path)
    if train_dir.name != "train":
        raise ValueError(f"train.demo_data: data.datasets[0].path must end in /train (got {train_dir})")
    if not train_dir.is_dir() or not any(train_dir.glob("*.parquet")):
        from otterhd_ray.data.synth import synthesize

        n = cfg.data.datasets[0].num_samples
        logging.getLogger("otterhd_ray.demo").info(
            "demo: synthesising %s training samples into %s", n if n > 0 else 64, train_dir
        )
        # the held-out benchmark (another seed) too when the config's in-training evaluation reads it from beside
        # the shards
        bench = cfg.eval is not None and Path(cfg.eval.data_path) == train_dir.parent / "magnifierbench"
        synthesize(train_dir.parent, num_train=n if n > 0 else 64, num_bench=NUM_BENCH if bench else 0,
                   seed=cfg.data.seed, level=LEVEL, bench_seed=cfg.data.seed + 1, mc_fraction=MC_FRACTION,
                   mc_prompt=benchmark_prompt())
    ensure_tokenizer(cfg.data.tokenizer_path)


def finetune_config(workdir: Path) -> FinetuneConfig:
    cfg = validate_config(FinetuneConfig, _load_with_workdir(FINETUNE_CONFIG, workdir), str(FINETUNE_CONFIG))
    # Use every synthesised row, bad ones included, so the reject accounting is on show.
    for spec in cfg.data.datasets:
        spec.num_samples = -1
    return cfg


def step_data(workdir: Path, cfg: FinetuneConfig) -> None:
    from otterhd_ray.data.pipeline import run_pipeline_stats
    from otterhd_ray.data.synth import synthesize

    data_dir = workdir / "data"
    if not (data_dir / "train").is_dir():
        stats = synthesize(
            data_dir, num_train=NUM_TRAIN, num_bench=NUM_BENCH, seed=SEED, num_bad=NUM_BAD, level=LEVEL,
            bench_seed=BENCH_SEED, mc_fraction=MC_FRACTION, mc_prompt=benchmark_prompt(),
        )
        print(f"synthesised {stats['num_train']} training rows ({LEVEL} level, + {stats['num_bad']} bad and "
              f"{stats['num_odd']} odd rows) and {stats['num_bench']} held-out benchmark items (seed "
              f"{stats['bench_seed']}) in {stats['seconds']:.0f} s")
    else:
        print(f"reusing data in {data_dir}")
    ensure_tokenizer(cfg.data.tokenizer_path)
    run_pipeline_stats(cfg, world_size=cfg.ray.num_workers or 1)


def benchmark_prompt() -> str:
    """The evaluation's MC prompt: the training rows in MC format carry the same one."""
    return yaml.safe_load(BENCHMARK_CONFIG.read_text())["datasets"][0].get("prompt", "")


def export_untrained(cfg: FinetuneConfig, workdir: Path) -> Path:
    """The weights the fine-tune starts from (the loop seeds torch with `train.seed` before building the
    model, so these are the same), as an HF directory the evaluation can read."""
    import shutil

    import torch

    from otterhd_ray.models.fuyu import save_hf
    from otterhd_ray.train.loop import build_model_for

    out = workdir / UNTRAINED_DIR
    torch.manual_seed(cfg.train.seed)
    save_hf(build_model_for(cfg, torch.device("cpu")), out)
    shutil.copytree(cfg.data.tokenizer_path, out, dirs_exist_ok=True)
    return out


class _Tail:
    """The complete lines appended to a JSONL file since the last read (an earlier run's records are skipped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.is_file() else 0

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self.path.open() as f:
            f.seek(self.offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines()]


class Progress(threading.Thread):
    """Prints a progress line about every tenth of the run from the fine-tune's metrics.jsonl as it grows, and a
    line per in-training evaluation (`eval:`, eval_metrics.jsonl).

    The driver's own view, so it needs no worker log forwarding. The ETA is the pace between logged steps
    (start-up is not training pace); the first line shows none rather than a wrong one."""

    def __init__(self, output_dir: Path, lines: int = 10) -> None:
        from otterhd_ray.train.evaluation import EVAL_HISTORY_FILE as EVAL_HISTORY

        super().__init__(daemon=True)
        self.lines = lines
        self.metrics, self.evals = _Tail(output_dir / "metrics.jsonl"), _Tail(output_dir / EVAL_HISTORY)
        self.stop = threading.Event()
        self._first: tuple[float, int] | None = None
        self._next_step = 0
        self.last: dict[str, Any] | None = None
        self.losses: list[float] = []  # every logged step's loss, for the run's summary line
        self.eval_history: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.poll()
        self.poll()

    def poll(self) -> None:
        for m in self.metrics.records():
            self.show(m)
        for e in self.evals.records():
            self.show_eval(e)

    def show(self, m: dict[str, Any]) -> None:
        now, step, total = time.perf_counter(), int(m["step"]), int(m.get("total_steps") or 0)
        self.last = m
        self.losses.append(float(m["loss"]))
        if self._first is None:
            self._first = (now, step)
        if step < self._next_step and step != total:
            return
        self._next_step = step + max(1, total // self.lines)
        t0, s0 = self._first
        eta = f"  ETA {int((now - t0) / (step - s0) * (total - step))} s" if step > s0 and total else ""
        print(f"  step {step:4d}/{total}  loss {m['loss']:.3f}  lr {m['lr']:.1e}  {m['tokens_per_s']:,.0f} tokens/s"
              f"{eta}", flush=True)

    def show_eval(self, e: dict[str, Any]) -> None:
        self.eval_history.append(e)
        acc = e.get(f"eval/{e.get('eval/benchmark')}/mc_accuracy")
        when = {"epoch_end": f"end of epoch {int(e.get('epoch', 0)) + 1}", "end": "end of training"}.get(
            str(e.get("eval/trigger")), str(e.get("eval/trigger")))
        score = "n/a" if acc is None else f"{100 * acc:.1f} %"
        print(f"  step {int(e['step']):4d}  {when}: held-out MC accuracy {score} on {e.get('eval/num_items')} items "
              f"({e.get('eval/seconds', 0):.0f} s)", flush=True)


def step_finetune(cfg: FinetuneConfig) -> Any:
    """Train only: the export step writes the HF directory the evaluation reads (`workdir/export`)."""
    from otterhd_ray.train.trainer import resolve_paths, run_finetune

    ensure_demo_data(resolve_paths(cfg))  # `--steps finetune` on a fresh workdir
    # A demo shows a run from the start: the same run name would otherwise resume the earlier, finished one
    clear_earlier(Path(cfg.train.output_dir), Path(cfg.ray.storage_path) / cfg.ray.name)
    metrics_path = Path(cfg.train.output_dir) / "metrics.jsonl"
    progress = Progress(Path(cfg.train.output_dir))
    progress.start()
    started = time.perf_counter()
    try:
        result = run_finetune(cfg)
    finally:
        progress.stop.set()
        progress.join()
    if getattr(result, "error", None):
        raise RuntimeError(f"fine-tune failed: {result.error}")
    steps = (progress.last or {}).get("step", "?")
    print(f"fine-tune: {steps} steps in {time.perf_counter() - started:.0f} s (Ray start-up included), "
          f"{loss_trend(progress.losses)}; curves in {metrics_path.with_name('loss.png')}")
    return result


def clear_earlier(*paths: Path) -> None:
    """Removes an earlier demo run's outputs (the synthesised data and the index cache stay), saying so."""
    import shutil

    found = [p for p in paths if p.exists()]
    for path in found:
        shutil.rmtree(path)
    if found:
        print("removed the earlier demo run's " + ", ".join(str(p) for p in found))


def loss_trend(losses: list[float]) -> str:
    """Mean loss of the first and the last tenth of the logged steps: single log points are noisy."""
    if not losses:
        return "no loss logged"
    tenth = max(1, len(losses) // 10)
    head, tail = losses[:tenth], losses[-tenth:]
    return (f"mean loss {sum(head) / len(head):.3f} (first tenth of the logged steps) -> "
            f"{sum(tail) / len(tail):.3f} (last tenth)")


def latest_checkpoint(cfg: FinetuneConfig) -> Path:
    root = Path(cfg.ray.storage_path).resolve() / cfg.ray.name
    found = sorted((p for p in root.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {root}: run the finetune step first")
    return found[-1]


def step_export(cfg: FinetuneConfig, workdir: Path, checkpoint: str | None = None, verbose: bool = True) -> Path:
    import io

    from otterhd_ray.export import export_checkpoint

    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(cfg)
    # DeepSpeed's ZeRO consolidation prints its progress to stdout/stderr; kept back unless it fails (or -v).
    captured = io.StringIO()
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(captured)
    quiet_err = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(captured)
    try:
        with quiet, quiet_err:
            out = export_checkpoint(ckpt, workdir / "export")
    except Exception:
        print(captured.getvalue())
        raise
    print(f"exported {ckpt} -> {out}")
    return Path(out)


def step_evaluate(workdir: Path) -> dict[str, Any]:
    from otterhd_ray.eval.config import BenchmarkConfig
    from otterhd_ray.eval.pipeline import run_evaluation

    raw = _load_with_workdir(BENCHMARK_CONFIG, workdir)
    cfg = validate_config(BenchmarkConfig, raw, str(BENCHMARK_CONFIG))
    clear_earlier(Path(cfg.output_dir))  # results of earlier weights must not be "resumed" into this report
    metrics = run_evaluation(cfg)
    print(summary_line(metrics))
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    """Before -> after in one line, and what the numbers mean in another."""
    runs = {r["model"]: r for r in metrics.get("runs", [])}
    before, after = runs.get("untrained"), runs.get("fine-tuned")
    if not (before and after):
        return ""

    def pct(r: dict[str, Any]) -> str:
        return "n/a" if r["mc_accuracy"] is None else f"{100 * r['mc_accuracy']:.1f} %"

    def guessed(r: dict[str, Any]) -> str:
        # MMMU's rule for a reply that names no option: a uniform guess among the four (its expected score)
        c = r["counts"]
        return f"{100 * (c['mc_correct'] + c['unparsed'] / 4) / max(c['evaluated'], 1):.0f} %"

    n, unparsed = after["counts"]["evaluated"], before["counts"]["unparsed"]
    return (
        f"\nheld-out MC accuracy: untrained {pct(before)} -> fine-tuned {pct(after)} ({n} items, 4 options; "
        f"unparsed replies: {unparsed} -> {after['counts']['unparsed']})\n"
        "meaning: the share of benchmark questions (scenes the fine-tune never saw) answered with the correct "
        "option; an unparsed reply (one that names no option) counts as wrong, and the untrained model's "
        f"replies name none, hence its score; guessing scores 25 % (with a random guess for every unparsed reply, "
        f"as MMMU scores them: untrained {guessed(before)}, fine-tuned {guessed(after)})."
    )


def quiet_output(verbose: bool) -> None:
    """Without `-v`: stage banners, progress lines and tables; warnings and errors still show.

    Ray is started here (finetune and evaluation then join it: one start-up) without forwarding the workers'
    logs: their start-up chatter (DeepSpeed's accelerator notice, Train's placement-group cleaner, torch
    deprecation notices) asks nothing of the user. A failure is not hidden: the fine-tune's and evaluation's
    errors come back to this process and are raised, and `-v` (or the Ray session logs) has every line."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("ray", "ray.data", "ray.train", "httpx", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)


# Ray Data's actor pools pass their map function to the actors by object reference and restart actors by
# default, which makes Ray core log this at ERROR level for every pool (ray-project/ray#53727). Ray Data keeps
# the reference alive for the pool's life, so the restart it warns about works: nothing for the user to do.
KNOWN_BENIGN_STDERR = ("constructor arguments in the object store and max_restarts > 0",)


@contextlib.contextmanager
def drop_known_benign_stderr(patterns: tuple[str, ...] = KNOWN_BENIGN_STDERR) -> Iterator[None]:
    """Forwards this process's stderr (fd 2, where Ray's C++ core logs too) line by line, except lines with one
    of `patterns`. Everything else, errors included, still shows; `-v` does not filter at all."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def forward() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                if not any(p.encode() in line for p in patterns):
                    os.write(saved_fd, line)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)  # closes our write end; the thread sees EOF and ends
        thread.join(timeout=5)
        if not thread.is_alive():  # a child started meanwhile may hold the pipe: then its lines keep flowing
            os.close(saved_fd)


def start_ray(cfg: FinetuneConfig, verbose: bool) -> None:
    import ray

    from otterhd_ray.raycluster import local_num_cpus

    if ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster's own logging stays as it is
    ray.init(num_cpus=local_num_cpus(max(cfg.ray.num_workers, 1) * cfg.ray.cpus_per_worker),
             include_dashboard=False, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.ERROR)
    if not verbose:
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name in ("ray", "ray.data", "ray.train"):  # ray.init configured its own handlers and levels
            logging.getLogger(name).setLevel(logging.ERROR)


def run_demo(workdir: str | Path = "demo_output", steps: str = "all", verbose: bool = False) -> None:
    quiet_output(verbose)
    chosen = STEPS if steps == "all" else tuple(s.strip() for s in steps.split(","))
    unknown = set(chosen) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown demo steps {sorted(unknown)}; choose from {STEPS}")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = finetune_config(workdir)
    started = time.perf_counter()
    if "data" in chosen:
        _banner("1/4 data: synthesise shards + benchmark, run the input pipeline")
        step_data(workdir, cfg)
        print(f"untrained weights (the fine-tune's start) -> {export_untrained(cfg, workdir)}")
    if {"finetune", "evaluate"} & set(chosen):
        start_ray(cfg, verbose)
    if "finetune" in chosen:
        _banner(f"2/4 fine-tune: {cfg.model.flavour} Fuyu (random init), {cfg.ray.num_workers} Ray Train workers, "
                f"DeepSpeed ZeRO-{cfg.deepspeed.stage} on CPU")
        result = step_finetune(cfg)
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    else:
        checkpoint = None
    if "export" in chosen:
        _banner("3/4 export: training checkpoint -> HF directory")
        step_export(cfg, workdir, checkpoint, verbose)
    if "evaluate" in chosen:
        _banner("4/4 evaluate: untrained vs fine-tuned on the held-out benchmark, Ray actors")
        with contextlib.nullcontext() if verbose else drop_known_benign_stderr():
            step_evaluate(workdir)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; outputs under {workdir}")
