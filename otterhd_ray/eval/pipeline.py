"""Evaluation pipeline: benchmark items -> predictor actor pool (Ray Data) -> async judge -> files -> report.

For each model x dataset of the config:
1. load the items (skips counted by reason);
2. skip items an identical earlier run already predicted (`predictions.jsonl` in the run directory, matched
   by a fingerprint of model path, resolution, prompt, max_new_tokens);
3. stream the rest through `map_batches(Predictor, compute=ActorPoolStrategy(size=num_actors), num_gpus=...)`;
   every finished item is appended to `predictions.jsonl` the moment its batch arrives, so a crash loses no
   finished item and the next run continues where this one stopped;
4. judge free-form answers as predictions arrive, on an asyncio loop in a driver thread (the judge is I/O
   bound: one async client with a semaphore is enough, and a single process owns the on-disk verdict cache);
   each judged item is appended to `results.jsonl`, rewritten in benchmark order at the end;
5. metrics per run; `report.write_report` writes metrics.json and report.md.

A predictor failure (an actor dying, out of memory) does not lose the finished items: the run is reported with
the failure and the unfinished items counted as `failed`; rerunning the same config continues.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from otterhd_ray.eval.config import BenchDatasetSpec, BenchmarkConfig, BenchModelSpec, resolve_api_key
from otterhd_ray.eval.judge import JudgeRequest, JudgeResult, make_judge
from otterhd_ray.eval.magnifierbench import (
    BenchItem,
    LoadResult,
    format_for_model,
    load_magnifierbench,
    mc_prompt,
)
from otterhd_ray.eval.report import write_report
from otterhd_ray.eval.scoring import parse_mc

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.jsonl"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def run_fingerprint(model: BenchModelSpec, dataset: BenchDatasetSpec, max_new_tokens: int) -> str:
    """What makes a stored prediction reusable: same model, image size, questions and decode length."""
    key = {
        "model": [model.name, str(Path(model.model_path).expanduser().resolve()), model.resolution],
        **({"adapter": str(Path(model.adapter_path).expanduser().resolve())} if model.adapter_path else {}),
        "dataset": [dataset.name, dataset.data_path, dataset.split, dataset.prompt],
        "max_new_tokens": max_new_tokens,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every well-formed line; a torn last line (crash mid-write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class _AppendLog:
    """A JSONL file appended line by line from several threads, flushed after every line."""

    def __init__(self, path: Path, truncate: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = path.open("w" if truncate else "a")
        self._lock = threading.Lock()

    def write(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


class _JudgeRunner:
    """Runs a judge's coroutines on an event loop in a daemon thread; submit() returns a concurrent Future."""

    def __init__(self, judge: Any):
        self.judge = judge
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="judge-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if hasattr(self.judge, "aclose"):
            asyncio.run_coroutine_threadsafe(self.judge.aclose(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()


def ensure_ray(cfg: BenchmarkConfig) -> bool:
    """Connect to the configured / RAY_ADDRESS cluster, else start a local one; True when we started it."""
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # More logical CPUs than cores: actors hold fractional CPUs and Ray Data's read/split tasks still get
        # slots on a small machine (a pool of 1-CPU actors on 2 CPUs starves them and hangs).
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    return True


def _model_inputs(items: list[BenchItem], model: BenchModelSpec, dataset: BenchDatasetSpec) -> list[dict]:
    return [
        {
            "id": it.id,
            "image": it.image,
            "mc_text": format_for_model(model.name, mc_prompt(it.instruction, dataset.prompt)),
            "ff_text": format_for_model(model.name, it.question),
        }
        for it in items
    ]


def _predict_stream(cfg: BenchmarkConfig, model: BenchModelSpec, rows: list[dict], predictor_cls: Any):
    """Yield the predictor's output rows as their batches finish."""
    import ray  # noqa: PLC0415

    # Ray Data bundles blocks up to batch_size per call: with few items a full batch would leave actors idle,
    # so shrink the batch until every actor gets one.
    batch_size = max(1, min(cfg.batch_size, math.ceil(len(rows) / cfg.num_actors)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    ds = ds.map_batches(
        predictor_cls,
        fn_constructor_kwargs={
            "model_path": model.model_path,
            "resolution": model.resolution,
            "max_new_tokens": cfg.max_new_tokens,
            "device": cfg.device,
            "dtype": cfg.dtype,
            "preprocess_threads": cfg.preprocess_threads,
            **({"adapter_path": model.adapter_path} if model.adapter_path else {}),
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=cfg.gpus_per_actor or None,
        num_cpus=cfg.cpus_per_actor,
        batch_size=batch_size,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["id"])):
            yield {k: _plain(v[i]) for k, v in batch.items()}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _prediction_record(
    item: BenchItem, out: dict[str, Any], mc_question: str, mc_text: str, fingerprint: str
) -> dict[str, Any]:
    return {
        "fingerprint": fingerprint,
        "id": item.id,
        # The seed's question (prompt + instruction): what the legacy parser reads its options from.
        "mc_question": mc_question,
        "mc_model_input": mc_text,
        "mc_response": str(out.get("mc_response", "")),
        "answer": item.answer,
        "options": item.options,
        "ff_question": item.question,
        "ff_response": str(out.get("ff_response", "")),
        "ff_answer": item.answer_text,
        "num_prompt_tokens": int(out.get("num_prompt_tokens", 0)),
        "num_new_tokens": int(out.get("num_new_tokens", 0)),
        "generate_s": float(out.get("generate_s", 0.0)),  # this item's share of its batch's generate call
        "error": str(out.get("error", "")),
    }


class _EvalMetrics:
    """`ray.util.metrics` for the evaluation (Prometheus export of every Ray node; Grafana's evaluation row).

    Counters `otterhd_eval_items_done`, `otterhd_eval_judge_requests`, `otterhd_eval_judge_retries`,
    `otterhd_eval_judge_failures` and gauge `otterhd_eval_items_per_s`, tagged by model and dataset. A no-op
    without Ray (plain pytest, `--no-ray` runs)."""

    def __init__(self, model: str, dataset: str) -> None:
        self._on = False
        self._last = {"requests": 0, "retries": 0}
        self._start = time.perf_counter()
        self._done = 0
        try:
            import ray  # noqa: PLC0415

            if not ray.is_initialized():
                return
            from ray.util.metrics import Counter, Gauge  # noqa: PLC0415
        except ImportError:
            return
        keys = ("model", "dataset")
        self._tags = {"model": model, "dataset": dataset}
        self._counters = {
            name: Counter(f"otterhd_eval_{name}", description=f"evaluation {name}", tag_keys=keys)
            for name in ("items_done", "judge_requests", "judge_retries", "judge_failures")
        }
        self._rate = Gauge("otterhd_eval_items_per_s", description="items predicted per second", tag_keys=keys)
        self._on = True

    def item_predicted(self) -> None:
        self._done += 1
        if self._on:
            self._counters["items_done"].inc(1, tags=self._tags)
            self._rate.set(self._done / max(time.perf_counter() - self._start, 1e-9), tags=self._tags)

    def item_judged(self, stats: Any, failed: bool) -> None:
        """Called on the judge's loop after each item: counts the requests/retries made since the last call."""
        if not self._on:
            return
        for name in ("requests", "retries"):
            now = getattr(stats, name)
            if now > self._last[name]:
                self._counters[f"judge_{name}"].inc(now - self._last[name], tags=self._tags)
            self._last[name] = now
        if failed:
            self._counters["judge_failures"].inc(1, tags=self._tags)


def evaluate_one(
    cfg: BenchmarkConfig,
    model: BenchModelSpec,
    dataset: BenchDatasetSpec,
    loaded: LoadResult,
    predictor_cls: Any,
) -> dict[str, Any]:
    """Predict, judge and score one model on one dataset; returns the run's metrics."""
    start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    run_dir = out_dir / f"{_slug(model.display_name)}__{_slug(dataset.name + '-' + dataset.split)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = run_fingerprint(model, dataset, cfg.max_new_tokens)
    items = {it.id: it for it in loaded.items}

    done: dict[str, dict[str, Any]] = {}
    if cfg.resume:
        for rec in read_jsonl(run_dir / PREDICTIONS_FILE):
            if rec.get("fingerprint") == fingerprint and not rec.get("error") and rec.get("id") in items:
                done[rec["id"]] = rec
    resumed = len(done)
    todo = [it for it in loaded.items if it.id not in done]

    judge = make_judge(
        cfg.judge, resolve_api_key(dataset, cfg.judge), cfg.judge.cache_path or out_dir / "judge_cache.jsonl"
    )
    runner = _JudgeRunner(judge)
    ray_metrics = _EvalMetrics(model.display_name, f"{dataset.name}/{dataset.split}")
    predictions = _AppendLog(run_dir / PREDICTIONS_FILE, truncate=not cfg.resume)
    results_log = _AppendLog(run_dir / RESULTS_FILE, truncate=True)
    records: dict[str, dict[str, Any]] = {}
    futures: list[concurrent.futures.Future] = []

    async def judge_and_record(rec: dict[str, Any]) -> None:
        request = JudgeRequest(
            rec["id"],
            rec["ff_question"],
            rec["ff_response"],
            rec["ff_answer"],
            tuple(rec["options"].values()),
        )
        try:
            res = await judge.judge(request)
        except Exception as err:  # noqa: BLE001 - a judge bug must not lose the item: it stays unjudged
            res = JudgeResult(rec["id"], None, error=f"{type(err).__name__}: {err}"[:300])
        rec = dict(
            rec,
            ff_verdict=res.verdict,
            judge_reply=res.reply,
            judge_error=res.error,
            judge_attempts=res.attempts,
            judge_cached=res.cached,
        )
        records[rec["id"]] = rec
        results_log.write(rec)
        ray_metrics.item_judged(judge.stats, failed=res.verdict is None)

    def submit(rec: dict[str, Any]) -> None:
        futures.append(runner.run(judge_and_record(rec)))

    for rec in done.values():
        submit(rec)

    failed: dict[str, str] = {}
    prediction_error = ""
    predict_start = time.perf_counter()
    predicted = 0
    generate_s = 0.0
    if todo:
        rows = _model_inputs(todo, model, dataset)
        mc_texts = {r["id"]: r["mc_text"] for r in rows}
        try:
            for out in _predict_stream(cfg, model, rows, predictor_cls):
                item = items[str(out["id"])]
                question = mc_prompt(item.instruction, dataset.prompt)
                rec = _prediction_record(item, out, question, mc_texts[item.id], fingerprint)
                predictions.write(rec)
                if rec["error"]:
                    failed[item.id] = rec["error"]
                    continue
                predicted += 1
                ray_metrics.item_predicted()
                generate_s += rec["generate_s"]
                if dataset.debug:
                    log.info(
                        "%s: MC %r -> %r | FF %r -> %r",
                        item.id,
                        rec["mc_question"],
                        rec["mc_response"],
                        rec["ff_question"],
                        rec["ff_response"],
                    )
                submit(rec)
        except Exception as err:  # noqa: BLE001 - report and keep every finished item; a rerun continues
            prediction_error = f"{type(err).__name__}: {err}"[:1000]
            log.error(
                "prediction stopped early for %s on %s: %s",
                model.display_name,
                dataset.name,
                prediction_error,
            )
    predict_s = time.perf_counter() - predict_start
    predictions.close()

    concurrent.futures.wait(futures)
    runner.close()
    results_log.close()
    for item_id in items:
        if item_id not in records and item_id not in failed:
            failed[item_id] = prediction_error or "not predicted"

    ordered = [records[i] for i in items if i in records]
    for rec in ordered:
        rec["mc_pred"] = parse_mc(rec["mc_response"], rec["options"], rec["mc_question"], cfg.mc_parse)
        rec["mc_correct"] = rec["mc_pred"] == rec["answer"]
    _rewrite_sorted(run_dir / RESULTS_FILE, ordered)
    return _run_metrics(
        cfg,
        model,
        dataset,
        loaded,
        ordered,
        failed,
        judge,
        run_dir,
        prediction_error,
        wall_s=time.perf_counter() - start,
        predict_s=predict_s,
        generate_s=generate_s,
        predicted=predicted,
        resumed=resumed,
    )


def _rewrite_sorted(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _run_metrics(
    cfg,
    model,
    dataset,
    loaded,
    recs,
    failed,
    judge,
    run_dir,
    prediction_error,
    *,
    wall_s,
    predict_s,
    predicted,
    resumed,
    generate_s=0.0,
) -> dict[str, Any]:
    parsed = sum(1 for r in recs if r["mc_pred"] is not None)
    mc_correct = sum(1 for r in recs if r["mc_correct"])
    judged = sum(1 for r in recs if r["ff_verdict"] is not None)
    ff_correct = sum(1 for r in recs if r["ff_verdict"] is True)
    stats = judge.stats.as_dict()
    if judge.kind == "rule":
        stats.update(requests=0, retries=0, cache_hits=0)
    stats["estimated_cost_usd"] = (
        stats["prompt_tokens"] / 1000 * cfg.judge.prompt_usd_per_1k
        + stats["completion_tokens"] / 1000 * cfg.judge.completion_usd_per_1k
    )
    metrics: dict[str, Any] = {
        "model": model.display_name,
        "model_name": model.name,
        "model_path": model.model_path,
        "adapter_path": model.adapter_path,
        "resolution": model.resolution,
        "dataset": f"{dataset.name}/{dataset.split}",
        "data_path": dataset.data_path,
        "mc_parse": cfg.mc_parse,
        "mc_accuracy": _ratio(mc_correct, len(recs)),
        "ff_accuracy": _ratio(ff_correct, judged),
        "counts": {
            "rows": loaded.num_rows,
            "usable": len(loaded.items),
            "evaluated": len(recs),
            "failed": len(failed),
            "skipped": sum(loaded.skipped.values()),
            "skipped_by_reason": dict(loaded.skipped),
            "skipped_multi_image": loaded.skipped.get("multi_image", 0),
            "parsed": parsed,
            "unparsed": len(recs) - parsed,
            "mc_correct": mc_correct,
            "judged": judged,
            "unjudged": len(recs) - judged,
            "ff_correct": ff_correct,
        },
        "skipped_ids": loaded.skipped_ids,
        "failed_ids": dict(sorted(failed.items())[:100]),
        "judge": stats,
        "timing": {
            "wall_s": wall_s,
            "predict_s": predict_s,
            "predicted_this_run": predicted,
            "resumed": resumed,
            "items_per_s": _ratio(predicted, predict_s) if predicted else None,
            # Time inside the model's generate only (summed over actors): the steady-state rate of one actor,
            # without actor start-up, model loading and image preparation.
            "generate_s": generate_s,
            "items_per_generate_s": _ratio(predicted, generate_s) if predicted and generate_s > 0 else None,
        },
        "prediction_error": prediction_error,
        "results_path": str(run_dir / RESULTS_FILE),
    }
    if cfg.mc_parse == "legacy":
        # The seed divides by every row of the dataset (skipped ones included) and counts an unreadable
        # judgment as wrong; these two reproduce its numbers exactly.
        metrics["mc_accuracy_seed_denominator"] = _ratio(mc_correct, loaded.num_rows)
        metrics["ff_accuracy_seed_denominator"] = _ratio(ff_correct, len(recs))
    return metrics


def run_evaluation(
    cfg: BenchmarkConfig, *, predictor_cls: Any = None, print_report: bool = True
) -> dict[str, Any]:
    """Evaluate every model on every dataset of `cfg`; write metrics.json / report.md; return the metrics."""
    if predictor_cls is None:
        from otterhd_ray.eval.predictor import Predictor as predictor_cls  # noqa: N813, PLC0415

        if not (cfg.ray_address or os.environ.get("RAY_ADDRESS")):
            # A local run reads the model on this machine: say so now, not after Ray and the actors start.
            for model in cfg.models:
                if not Path(model.model_path).expanduser().is_dir():
                    raise ValueError(
                        f"model_path {model.model_path!r} is not a local directory; download the HF model "
                        "(e.g. adept/fuyu-8b) and point model_path at it"
                    )
                if model.adapter_path and not Path(model.adapter_path).expanduser().is_dir():
                    raise ValueError(f"adapter_path {model.adapter_path!r} is not a local PEFT adapter directory")
    start = time.perf_counter()
    loaded = {}
    for ds in cfg.datasets:
        key = (ds.data_path, ds.split, ds.max_items)
        if key not in loaded:
            loaded[key] = load_magnifierbench(ds)
    started = ensure_ray(cfg)
    runs = []
    try:
        for model in cfg.models:
            for ds in cfg.datasets:
                runs.append(
                    evaluate_one(
                        cfg, model, ds, loaded[(ds.data_path, ds.split, ds.max_items)], predictor_cls
                    )
                )
    finally:
        if started:
            import ray  # noqa: PLC0415

            ray.shutdown()
    metrics = {
        "runs": runs,
        "wall_s": time.perf_counter() - start,
        "config": cfg.model_dump(mode="json"),
    }
    text = write_report(cfg.output_dir, metrics, extra_path=cfg.output)
    if print_report:
        print(text)
    return metrics
