"""Evaluation inside the training job (`eval:` of the fine-tune config), on the workers' own model.

The loop calls `after_step` once per optimizer step on every rank; when the step is due (`every_n_steps`, the
last step of an epoch, the last step of the run) each rank answers its share of the benchmark's items
(`items[rank::world_size]`) with the evaluation predictor (`eval.predictor.Predictor`: the same image
preparation, prompt layout and batched shared-prefix `generate` as `otterhd evaluate`), the responses are
gathered to every rank (`all_gather_object`), scored with the benchmark's own metric (`score_predictions`, the
rule judge) and logged: one log line, `output_dir/eval_metrics.jsonl`, `output_dir/eval/step_<N>.jsonl` (per
item), wandb, the `otterhd_train_eval_score` gauge, and `ray.train.report` (the loop joins them to the step's
checkpoint report, or reports them alone).

Evaluation leaves no trace on training: the model is switched to `eval()` and back, every RNG the run draws from
(torch CPU + this CUDA device, Python, NumPy) is restored, nothing touches the data iterator, the sample ledger,
the optimizer or the checkpoint, and the window's throughput excludes the evaluation time. A resumed run
evaluates only the steps it runs itself: an evaluation that ran before a crash and after the checkpoint it
resumes from is run again and recorded with the new `resumed_from_step`, like the training metrics.

ZeRO-3: each rank holds only a shard of every weight, and the model's forwards gather the others through
DeepSpeed's hooks, collectively, inside the engine's forward. Generation is not an engine forward, and ranks
generate different numbers of decode steps (answers end at different lengths), so lock-step gathering per
forward would need every rank to pad to the longest item and step count. Instead the weights are gathered once
for the whole evaluation and DeepSpeed's hooks are lifted meanwhile (`deepspeed.runtime.zero.stage3.
unwrap_model_for_generation`, DeepSpeed's own helper for generation during ZeRO-3 training; TRL does the same):
one collective in, none during generation, so ranks may hold unequal item counts. The price is one full copy of
the weights per rank while evaluating (16 GiB in bf16 for 8B), released afterwards. ZeRO-0/1/2, DDP and the
single-process engines keep full weights and generate from the bare model directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from otterhd_ray.config import FinetuneConfig, TrainEvalConfig
from otterhd_ray.eval.benchmarks import (
    Benchmark,
    Item,
    LoadResult,
    ScoreContext,
    format_for_model,
    get_benchmark,
    score_predictions,
)
from otterhd_ray.eval.config import BenchDatasetSpec
from otterhd_ray.eval.judge import RuleJudge
from otterhd_ray.train.checkpoint import TrainState
from otterhd_ray.train.engine import Engine
from otterhd_ray.train.metrics import MetricsSink, WindowAccumulator

logger = logging.getLogger("otterhd_ray.train")

EVAL_HISTORY_FILE = "eval_metrics.jsonl"
EVAL_RECORDS_DIR = "eval"
DEFAULT_MAX_NEW_TOKENS = 64


class Evaluator(Protocol):
    def after_step(self, state: TrainState, epoch: int, window: WindowAccumulator) -> dict[str, Any]:
        """The evaluation's metrics when this step was due (keys `step` and `eval/...`), else {}."""
        ...


class NoEvaluation:
    """No `eval:` section: nothing to do."""

    def after_step(self, state: TrainState, epoch: int, window: WindowAccumulator) -> dict[str, Any]:
        return {}


def build_evaluator(
    cfg: FinetuneConfig, engine: Engine, rank: int, world_size: int, sink: MetricsSink, resumed_from: int
) -> Evaluator:
    """The evaluator of `cfg.eval` (loads the benchmark now, so a bad path fails before the first step)."""
    if cfg.eval is None:
        return NoEvaluation()
    return TrainEvaluator(cfg, engine, rank, world_size, sink, resumed_from)


def benchmark_for(cfg: TrainEvalConfig) -> Benchmark:
    """The `eval:` section's benchmark (errors name the key)."""
    try:
        get_benchmark(cfg.benchmark)
    except ValueError as err:
        raise ValueError(f"eval.benchmark: {err}") from None
    spec = BenchDatasetSpec(
        name=cfg.benchmark, split=cfg.split, data_path=cfg.data_path, config=cfg.config, prompt=cfg.prompt,
        post_prompt=cfg.post_prompt, max_items=cfg.max_items,
    )
    return get_benchmark(cfg.benchmark)(spec)


def load_items(cfg: TrainEvalConfig) -> tuple[Benchmark, LoadResult]:
    """The benchmark and its items; no usable item is an error naming `eval.data_path`."""
    bench = benchmark_for(cfg)
    try:
        loaded = bench.load()
    except (OSError, ValueError) as err:
        raise ValueError(f"eval.data_path {bench.spec.data_path!r}: {err}") from None
    if not loaded.items:
        raise ValueError(
            f"eval.data_path {bench.spec.data_path!r} (split {bench.spec.split!r}) has no usable "
            f"{cfg.benchmark} items; skipped: {dict(loaded.skipped)}"
        )
    return bench, loaded


def due(cfg: TrainEvalConfig, step: int, epoch_ended: bool, is_last: bool) -> str | None:
    """Why step `step` (1-based, just finished) is evaluated: "end", "epoch_end", "every_n_steps" or None."""
    if is_last and cfg.at_end:
        return "end"
    if epoch_ended and cfg.at_epoch_end:
        return "epoch_end"
    if cfg.every_n_steps and step % cfg.every_n_steps == 0:
        return "every_n_steps"
    return None


@contextlib.contextmanager
def training_state_kept(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """`model.eval()` inside, its train/eval mode and every RNG of the run restored after: the training run's
    draws (dropout, LoRA dropout, anything seeded per rank) are the same with or without evaluation."""
    was_training = model.training
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            model.eval()
            yield
    finally:
        model.train(was_training)
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def generation_weights(engine: Engine) -> Iterator[None]:
    """Full weights on this rank for the duration (a collective under ZeRO-3: every rank must enter)."""
    ds_engine = getattr(engine, "ds_engine", None)
    if ds_engine is None or not ds_engine.zero_optimization_partition_weights():
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(ds_engine):
        yield


def all_gather(obj: Any, world_size: int) -> list[Any]:
    """Every rank's `obj` on every rank (rank order); the identity in a single process."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def answer_items(
    predictor: Any, items: list[Item], model_name: str, batch_size: int
) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """{id: {question key: response}} of the items answered, {id: error} of those that failed (an unreadable
    image, say). `predictor` is an `eval.predictor.Predictor`; the prompts are wrapped as `otterhd evaluate`
    wraps them, so the answers are the ones that command gives for the same weights."""
    answered: dict[str, dict[str, str]] = {}
    failed: dict[str, str] = {}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        texts = [json.dumps([format_for_model(model_name, t) for t in it.prompts.values()]) for it in chunk]
        batch = {
            "id": _object_array([it.id for it in chunk]),
            "image": _object_array([it.image for it in chunk]),
            "texts": _object_array(texts),
        }
        out = predictor(batch)
        for i, it in enumerate(chunk):
            if out["error"][i]:
                failed[it.id] = str(out["error"][i])
            else:
                answered[it.id] = dict(zip(it.prompts, json.loads(str(out["responses"][i])), strict=True))
    return answered, failed


class TrainEvaluator:
    """`eval:` of a fine-tune on the training workers (see the module docstring)."""

    def __init__(
        self, cfg: FinetuneConfig, engine: Engine, rank: int, world_size: int, sink: MetricsSink,
        resumed_from: int,
    ) -> None:
        from otterhd_ray.data.tokenizer import load_tokenizer
        from otterhd_ray.eval.predictor import Predictor

        assert cfg.eval is not None
        self.cfg, self.engine, self.rank, self.world_size = cfg.eval, engine, rank, world_size
        self.sink, self.resumed_from = sink, resumed_from
        self.out_dir = Path(cfg.train.output_dir)
        if not cfg.data.tokenizer_path:
            raise ValueError("eval: needs data.tokenizer_path (or model.path) to build prompts")
        self.bench, self.loaded = load_items(cfg.eval)
        self.items = self.loaded.items[rank::world_size]  # this rank's share; ranks may differ by one
        max_new = cfg.eval.max_new_tokens or self.bench.default_max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        with training_state_kept(engine.model, engine.device):  # Predictor switches the model to eval()
            self.predictor = Predictor.from_model(
                engine.model, load_tokenizer(cfg.data.tokenizer_path), resolution=cfg.eval.resolution,
                max_new_tokens=max_new, preprocess_threads=min(4, os.cpu_count() or 1),
            )

    def after_step(self, state: TrainState, epoch: int, window: WindowAccumulator) -> dict[str, Any]:
        # The loop has advanced the state: a finished epoch shows as state.epoch moving past `epoch`.
        step = state.global_step
        trigger = due(self.cfg, step, state.epoch != epoch, step >= state.total_steps)
        if trigger is None:
            return {}
        started = time.perf_counter()
        metrics = self.evaluate(step, epoch, trigger)
        window.started += time.perf_counter() - started  # throughput counts training time only
        return metrics

    def evaluate(self, step: int, epoch: int, trigger: str) -> dict[str, Any]:
        """Answer this rank's items, gather every rank's answers, score, log; every rank returns the same."""
        started = time.perf_counter()
        with training_state_kept(self.engine.model, self.engine.device), generation_weights(self.engine):
            answered, failed = answer_items(self.predictor, self.items, self.cfg.model_name, self.cfg.batch_size)
        responses: dict[str, dict[str, str]] = {}
        failures: dict[str, str] = {}
        for rank_answers, rank_failed in all_gather((answered, failed), self.world_size):
            responses.update(rank_answers)
            failures.update(rank_failed)
        records, agg = score_predictions(self.bench, self.loaded, responses, ScoreContext(self.cfg.mc_parse, RuleJudge()))
        name = self.cfg.benchmark
        metrics: dict[str, Any] = {
            "step": step,
            "eval/benchmark": name,
            "eval/trigger": trigger,
            "eval/num_items": len(records),
            "eval/num_failed": len(failures),
            "eval/seconds": time.perf_counter() - started,
            **{f"eval/{name}/{k}": v for k, v in agg.scores.items()},
        }
        if self.rank == 0:
            self._log(metrics, epoch, agg.headline, records, failures)
        return metrics

    def _log(
        self, metrics: dict[str, Any], epoch: int, headline: list[tuple[str, str]], records: list[dict[str, Any]],
        failures: dict[str, str],
    ) -> None:
        step, name = metrics["step"], self.cfg.benchmark
        history = {**metrics, "epoch": epoch, "resumed_from_step": self.resumed_from}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / EVAL_HISTORY_FILE).open("a") as f:
            f.write(json.dumps(history) + "\n")
        per_item = self.out_dir / EVAL_RECORDS_DIR / f"step_{step:06d}.jsonl"
        per_item.parent.mkdir(parents=True, exist_ok=True)
        with per_item.open("w") as f:
            for rec in records:
                f.write(json.dumps({**rec, "step": step}, default=str) + "\n")
            for item_id, error in failures.items():
                f.write(json.dumps({"id": item_id, "step": step, "error": error}) + "\n")
        self.sink.log_eval(history)
        scores = ", ".join(f"{label} {value}" for label, value in headline)
        failed = f", {len(failures)} failed" if failures else ""
        judge = " [rule judge]" if self.bench.uses_judge else ""
        logger.info("step %d: eval %s %s on %d items%s%s (%.1f s)", step, name, scores, metrics["eval/num_items"],
                    failed, judge, metrics["eval/seconds"])


def _object_array(values: list[Any]) -> np.ndarray:
    """A 1-D object column (the predictor's batch format) holding `values` as they are."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
