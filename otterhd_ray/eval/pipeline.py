"""Evaluation pipeline: benchmark items -> predictor actor pool (Ray Data) -> scoring (+ judge) -> files -> report.

For each model x dataset of the config (the dataset's `name` picks its module in `eval/benchmarks/`):
1. load the items (skips counted by reason);
2. skip items an identical earlier run already predicted (`predictions.jsonl` in the run directory, matched
   by a fingerprint of model path, resolution, prompts, max_new_tokens);
3. stream the rest through `map_batches(Predictor, compute=ActorPoolStrategy(size=num_actors), num_gpus=...)`;
   every finished item is appended to `predictions.jsonl` the moment its batch arrives, so a crash loses no
   finished item and the next run continues where this one stopped;
4. score items as predictions arrive (`Benchmark.score`), on an asyncio loop in a driver thread (a judge is
   I/O bound: one async client with a semaphore is enough, and a single process owns the on-disk verdict
   cache); each scored item is appended to `results.jsonl`, rewritten in benchmark order at the end;
5. metrics per run (`Benchmark.aggregate`); `report.write_report` writes metrics.json, report.md and the
   lmms-eval files.

A predictor failure (an actor dying, out of memory) does not lose the finished items: the run is reported with
the failure and the unfinished items counted as `failed`; rerunning the same config continues. A judge failure
that cannot heal (bad key) stops the judging at once; predictions are kept, so a rerun with the right key
only judges. `score_predictions_file` scores predictions made elsewhere with the same code, without Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from otterhd_ray.eval.benchmarks import (
    Benchmark,
    Item,
    LoadResult,
    ScoreContext,
    format_for_model,
    get_benchmark,
)
from otterhd_ray.eval.config import BenchDatasetSpec, BenchmarkConfig, BenchModelSpec, resolve_api_key
from otterhd_ray.eval.judge import make_judge
from otterhd_ray.eval.report import write_report
from otterhd_ray.raycluster import connect, has_cluster_address

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.jsonl"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def max_new_tokens_for(cfg: BenchmarkConfig, dataset: BenchDatasetSpec) -> int:
    """The dataset's answer length, else its benchmark's (long answers: MathVista, MM-Vet), else the config's."""
    bench = get_benchmark(dataset.name)
    return dataset.max_new_tokens or bench.default_max_new_tokens or cfg.max_new_tokens


def run_fingerprint(model: BenchModelSpec, dataset: BenchDatasetSpec, max_new_tokens: int) -> str:
    """What makes a stored prediction reusable: same model, image size, questions and decode length."""
    ds_key: list[Any] = [dataset.name, dataset.data_path, dataset.split, dataset.prompt]
    # Keys added with the benchmark registry join only when set, so MagnifierBench runs keep their fingerprint.
    ds_key += [v for v in (dataset.config, dataset.post_prompt) if v is not None]
    key = {
        "model": [model.name, str(Path(model.model_path).expanduser().resolve()), model.resolution],
        **({"adapter": str(Path(model.adapter_path).expanduser().resolve())} if model.adapter_path else {}),
        "dataset": ds_key,
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


def _model_inputs(items: list[Item], model: BenchModelSpec) -> list[dict]:
    return [
        {
            "id": it.id,
            "image": it.image,
            "texts": json.dumps([format_for_model(model.name, text) for text in it.prompts.values()]),
        }
        for it in items
    ]


def _predict_stream(
    cfg: BenchmarkConfig, model: BenchModelSpec, rows: list[dict], predictor_cls: Any, max_new_tokens: int
):
    """Yield the predictor's output rows as their batches finish."""
    import ray

    # Ray Data bundles blocks up to batch_size per call: with few items a full batch would leave actors idle,
    # so shrink the batch until every actor gets one.
    batch_size = max(1, min(cfg.batch_size, math.ceil(len(rows) / cfg.num_actors)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    ds = ds.map_batches(
        predictor_cls,
        fn_constructor_kwargs={
            "model_path": model.model_path,
            "resolution": model.resolution,
            "max_new_tokens": max_new_tokens,
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
    item: Item, out: dict[str, Any], model: BenchModelSpec, fingerprint: str, doc_id: int
) -> dict[str, Any]:
    keys = list(item.prompts)
    try:
        texts = json.loads(str(out.get("responses") or "[]"))
    except json.JSONDecodeError:
        texts = []
    error = str(out.get("error", ""))
    if not error and len(texts) != len(keys):
        error = f"predictor returned {len(texts)} responses for {len(keys)} questions"
    return {
        "fingerprint": fingerprint,
        "id": item.id,
        "doc_id": doc_id,
        "prompts": item.prompts,
        "model_inputs": {k: format_for_model(model.name, t) for k, t in item.prompts.items()},
        "responses": dict(zip(keys, (str(t) for t in texts), strict=False)) if not error else {},
        "num_prompt_tokens": int(out.get("num_prompt_tokens", 0)),
        "num_new_tokens": int(out.get("num_new_tokens", 0)),
        "generate_s": float(out.get("generate_s", 0.0)),  # this item's share of its batch's generate call
        "error": error,
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
            import ray

            if not ray.is_initialized():
                return
            from ray.util.metrics import Counter, Gauge
        except ImportError:
            return
        keys = ("model", "dataset")
        self._tags = {"model": model, "dataset": dataset}
        self._counters = {
            name: Counter(f"otterhd_eval_{name}", description=f"evaluation {name}", tag_keys=keys)
            for name in ("items_done", "judge_requests", "judge_retries", "judge_failures")
        }
        self._rate = Gauge(
            "otterhd_eval_items_per_s", description="items predicted per second", tag_keys=keys
        )
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


class _JudgeFactory:
    """Judges for the runs of one invocation. A judge that stopped on a failure that cannot heal (bad key)
    passes the stop on to later judges with the same endpoint, key and model: they send nothing."""

    def __init__(self, cfg: BenchmarkConfig) -> None:
        self.cfg = cfg
        self._stopped: dict[str, str] = {}  # sha256(endpoint, key, model) -> the cause
        self._issued: list[tuple[str, Any]] = []

    def _key(self, judge_cfg: Any, api_key: str | None) -> str:
        parts = [judge_cfg.api_type, judge_cfg.base_url or "", judge_cfg.model, api_key or ""]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def make(self, dataset: BenchDatasetSpec, bench: Benchmark) -> Any:
        """The judge a benchmark needs (None for rule-scored ones): the dataset's `gpt_model` over judge.model."""
        if not bench.uses_judge:
            return None
        cfg = self.cfg
        judge_cfg = (
            cfg.judge.model_copy(update={"model": dataset.gpt_model}) if dataset.gpt_model else cfg.judge
        )
        api_key = resolve_api_key(dataset, cfg.judge)
        judge = make_judge(
            judge_cfg, api_key, cfg.judge.cache_path or Path(cfg.output_dir) / "judge_cache.jsonl"
        )
        for key, earlier in self._issued:  # a stop seen since the last judge was made
            if getattr(earlier, "fatal_error", ""):
                self._stopped.setdefault(key, earlier.fatal_error)
        key = self._key(judge_cfg, api_key)
        judge.fatal_error = self._stopped.get(key, "")
        self._issued.append((key, judge))
        return judge


class _Scorer:
    """Scores prediction records on the judge's event loop as they arrive; keeps the scored records."""

    def __init__(
        self, bench: Benchmark, items: dict[str, Item], ctx: ScoreContext, log_path: Path, metrics: Any
    ):
        self.bench, self.items, self.ctx = bench, items, ctx
        self.runner = _JudgeRunner(ctx.judge)
        self.results_log = _AppendLog(log_path, truncate=True)
        self.metrics = metrics
        self.records: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}  # item id -> why scoring failed
        self.futures: list[concurrent.futures.Future] = []

    async def _score(self, rec: dict[str, Any]) -> None:
        item = self.items[rec["id"]]
        try:
            scored = await self.bench.score(item, rec["responses"], self.ctx)
        except Exception as err:  # noqa: BLE001 - a scoring bug fails this item (counted), never the run
            self.errors[rec["id"]] = f"scoring failed: {type(err).__name__}: {err}"[:300]
            log.exception("scoring item %s failed", rec["id"])
            return
        rec = {**rec, "target": item.target, "doc": item.doc, **scored}
        self.records[rec["id"]] = rec
        self.results_log.write(rec)
        if self.ctx.judge is not None:
            self.metrics.item_judged(self.ctx.judge.stats, failed=rec.get("judged") is False)

    def submit(self, rec: dict[str, Any]) -> None:
        self.futures.append(self.runner.run(self._score(rec)))

    def finish(self) -> None:
        concurrent.futures.wait(self.futures)
        self.runner.close()
        self.results_log.close()


def evaluate_one(
    cfg: BenchmarkConfig,
    model: BenchModelSpec,
    dataset: BenchDatasetSpec,
    loaded: LoadResult,
    predictor_cls: Any,
    judges: _JudgeFactory | None = None,
) -> dict[str, Any]:
    """Predict, score and aggregate one model on one dataset; returns the run's metrics."""
    judges = judges or _JudgeFactory(cfg)
    start = time.perf_counter()
    bench = get_benchmark(dataset.name)(dataset)
    run_dir = (
        Path(cfg.output_dir) / f"{_slug(model.display_name)}__{_slug(dataset.name + '-' + dataset.split)}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    max_new_tokens = max_new_tokens_for(cfg, dataset)
    fingerprint = run_fingerprint(model, dataset, max_new_tokens)
    items = {it.id: it for it in loaded.items}
    doc_ids = {it.id: i for i, it in enumerate(loaded.items)}

    done: dict[str, dict[str, Any]] = {}
    if cfg.resume:
        for rec in read_jsonl(run_dir / PREDICTIONS_FILE):
            if rec.get("fingerprint") == fingerprint and not rec.get("error") and rec.get("id") in items:
                done[rec["id"]] = rec
    todo = [it for it in loaded.items if it.id not in done]

    ray_metrics = _EvalMetrics(model.display_name, f"{dataset.name}/{dataset.split}")
    scorer = _Scorer(
        bench,
        items,
        ScoreContext(cfg.mc_parse, judges.make(dataset, bench)),
        run_dir / RESULTS_FILE,
        ray_metrics,
    )
    predictions = _AppendLog(run_dir / PREDICTIONS_FILE, truncate=not cfg.resume)
    for rec in done.values():
        scorer.submit(rec)

    predict_start = time.perf_counter()
    failed, prediction_error, predicted, generate_s = _predict_todo(
        cfg, model, dataset, todo, items, doc_ids, fingerprint, predictor_cls, max_new_tokens,
        predictions, scorer, ray_metrics,
    )
    predict_s = time.perf_counter() - predict_start
    predictions.close()
    scorer.finish()
    failed.update(scorer.errors)
    for item_id in items:
        if item_id not in scorer.records and item_id not in failed:
            failed[item_id] = prediction_error or "not predicted"

    ordered = [scorer.records[i] for i in items if i in scorer.records]
    _rewrite_sorted(run_dir / RESULTS_FILE, ordered)
    metrics = run_metrics(cfg, bench, loaded, ordered, failed, scorer.ctx.judge, run_dir)
    metrics.update(
        model=model.display_name, model_name=model.name, model_path=model.model_path,
        adapter_path=model.adapter_path,
    )
    metrics.update(
        resolution=model.resolution, prediction_error=prediction_error, max_new_tokens=max_new_tokens
    )
    metrics["timing"] = {
        "wall_s": time.perf_counter() - start,
        "predict_s": predict_s,
        "predicted_this_run": predicted,
        "resumed": len(done),
        "items_per_s": _ratio(predicted, predict_s) if predicted else None,
        # Time inside the model's generate only (summed over actors): the steady-state rate of one actor,
        # without actor start-up, model loading and image preparation.
        "generate_s": generate_s,
        "items_per_generate_s": _ratio(predicted, generate_s) if predicted and generate_s > 0 else None,
    }
    return metrics


def _predict_todo(
    cfg: BenchmarkConfig, model: BenchModelSpec, dataset: BenchDatasetSpec, todo: list[Item],
    items: dict[str, Item], doc_ids: dict[str, int], fingerprint: str, predictor_cls: Any, max_new_tokens: int,
    predictions: _AppendLog, scorer: _Scorer, ray_metrics: _EvalMetrics,
) -> tuple[dict[str, str], str, int, float]:
    """Predict the items not done yet, logging and scoring each as it arrives; a failure stops the run early
    with every finished item kept. Returns (failed id -> error, prediction_error, predicted, generate_s)."""
    failed: dict[str, str] = {}
    prediction_error = ""
    predicted, generate_s = 0, 0.0
    if not todo:
        return failed, prediction_error, predicted, generate_s
    try:
        for out in _predict_stream(cfg, model, _model_inputs(todo, model), predictor_cls, max_new_tokens):
            item = items[str(out["id"])]
            rec = _prediction_record(item, out, model, fingerprint, doc_ids[item.id])
            predictions.write(rec)
            if rec["error"]:
                failed[item.id] = rec["error"]
                continue
            predicted += 1
            ray_metrics.item_predicted()
            generate_s += rec["generate_s"]
            if dataset.debug:
                log.info("%s: %r -> %r", item.id, rec["prompts"], rec["responses"])
            scorer.submit(rec)
    except Exception as err:  # noqa: BLE001 - report and keep every finished item; a rerun continues
        prediction_error = f"{type(err).__name__}: {err}"[:1000]
        log.error("prediction stopped early for %s on %s: %s", model.display_name, dataset.name, prediction_error)
    return failed, prediction_error, predicted, generate_s


def _rewrite_sorted(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _judge_stats(cfg: BenchmarkConfig, judge: Any) -> dict[str, Any]:
    if judge is None:
        return {
            "kind": "none",
            "model": "",
            "requests": 0,
            "retries": 0,
            "retry_reasons": {},
            "cache_hits": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "estimated_cost_usd": 0.0,
        }
    stats = judge.stats.as_dict()
    if judge.kind == "rule":
        stats.update(requests=0, retries=0, cache_hits=0)
    stats["estimated_cost_usd"] = (
        stats["prompt_tokens"] / 1000 * cfg.judge.prompt_usd_per_1k
        + stats["completion_tokens"] / 1000 * cfg.judge.completion_usd_per_1k
    )
    return stats


def run_metrics(
    cfg: BenchmarkConfig,
    bench: Benchmark,
    loaded: LoadResult,
    records: list[dict[str, Any]],
    failed: dict[str, str],
    judge: Any,
    run_dir: Path,
) -> dict[str, Any]:
    """The run's metrics: the benchmark's scores and breakdown, counts, judge cost, and why items are unjudged."""
    agg = bench.aggregate(loaded, records)
    unjudged = [r for r in records if r.get("judged") is False]
    reasons = Counter(str(r.get("judge_error") or "unreadable")[:200] for r in unjudged)
    dataset = bench.spec
    counts = {
        "rows": loaded.num_rows,
        "usable": len(loaded.items),
        "evaluated": len(records),
        "failed": len(failed),
        "skipped": sum(loaded.skipped.values()),
        "skipped_by_reason": dict(loaded.skipped),
        "skipped_multi_image": loaded.skipped.get("multi_image", 0),
        "judged": sum(1 for r in records if r.get("judged") is True),
        "unjudged": len(unjudged),
        "unjudged_by_reason": dict(reasons.most_common(10)),
        **agg.counts,
    }
    return {
        "benchmark": bench.name,
        "task": bench.task,
        "dataset": f"{dataset.name}/{dataset.split}",
        "data_path": dataset.data_path,
        "mc_parse": cfg.mc_parse,
        "scores": agg.scores,
        "headline": agg.headline,
        "breakdown": agg.breakdown,
        **agg.extra,
        "counts": counts,
        "skipped_ids": loaded.skipped_ids,
        "failed_ids": dict(sorted(failed.items())[:100]),
        "judge": _judge_stats(cfg, judge),
        # A failure that stopped the judging (bad key): why every unjudged item is unjudged.
        "judge_error": getattr(judge, "fatal_error", "") or "",
        "results_path": str(run_dir / RESULTS_FILE),
    }


def _load_all(cfg: BenchmarkConfig) -> dict[tuple, LoadResult]:
    loaded: dict[tuple, LoadResult] = {}
    for ds in cfg.datasets:
        key = _load_key(ds)
        if key not in loaded:
            loaded[key] = get_benchmark(ds.name)(ds).load()
    return loaded


def _load_key(ds: BenchDatasetSpec) -> tuple:
    return (ds.name, ds.data_path, ds.split, ds.config, ds.max_items, ds.prompt, ds.post_prompt)


def run_evaluation(
    cfg: BenchmarkConfig, *, predictor_cls: Any = None, print_report: bool = True
) -> dict[str, Any]:
    """Evaluate every model on every dataset of `cfg`; write the report files; return the metrics."""
    if not cfg.models:
        raise ValueError(
            "no models: add `models: [{name, model_path}]`, or score given predictions with "
            "`otterhd evaluate --predictions FILE`"
        )
    if predictor_cls is None:
        from otterhd_ray.eval.predictor import Predictor as predictor_cls  # noqa: N813

        if not has_cluster_address(cfg.ray_address):
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
    loaded = _load_all(cfg)
    started = connect(cfg.ray_address)  # True: this run initialised Ray (and shuts it down)
    if started:
        _check_local_gpus(cfg)
    runs = []
    judges = _JudgeFactory(cfg)
    try:
        for model in cfg.models:
            for ds in cfg.datasets:
                runs.append(evaluate_one(cfg, model, ds, loaded[_load_key(ds)], predictor_cls, judges))
    finally:
        if started:
            import ray

            ray.shutdown()
    return _finish(cfg, runs, start, print_report)


def _check_local_gpus(cfg: BenchmarkConfig) -> None:
    """A local Ray never gains GPUs: an actor pool asking for more than it has would wait forever."""
    import ray

    have = float(ray.cluster_resources().get("GPU", 0.0))
    if cfg.gpus_per_actor * cfg.num_actors > have:
        ray.shutdown()
        raise ValueError(
            f"{cfg.num_actors} actors x gpus_per_actor={cfg.gpus_per_actor} but this machine's Ray has {have:g} GPUs; set gpus_per_actor: 0 "
            "(and device: cpu) to run on CPU, or connect to a GPU cluster (RAY_ADDRESS)"
        )


def _finish(
    cfg: BenchmarkConfig, runs: list[dict[str, Any]], start: float, print_report: bool
) -> dict[str, Any]:
    metrics = {"runs": runs, "wall_s": time.perf_counter() - start, "config": cfg.model_dump(mode="json")}
    text = write_report(cfg.output_dir, metrics, extra_path=cfg.output)
    if print_report:
        print(text)
    return metrics


# ------------------------------------------------------------------------------- given predictions
def _responses_of(rec: dict[str, Any], keys: tuple[str, ...], where: str) -> dict[str, str]:
    """A predictions line's answers: `responses` {key: text}, `response` (one-question benchmarks), or the
    MagnifierBench pair `mc_response` / `ff_response`."""
    if isinstance(rec.get("responses"), dict):
        got = rec["responses"]
    elif "response" in rec and len(keys) == 1:
        got = {keys[0]: rec["response"]}
    elif all(f"{k}_response" in rec for k in keys):
        got = {k: rec[f"{k}_response"] for k in keys}
    else:
        wanted = "'response'" if len(keys) == 1 else f"'responses' with keys {list(keys)}"
        raise ValueError(f"{where}: no answer; expected {wanted}")
    missing = [k for k in keys if not isinstance(got.get(k), str)]
    if missing:
        raise ValueError(f"{where}: responses lack text for {missing}")
    return {k: got[k] for k in keys}


def read_predictions(path: str | Path, datasets: list[BenchDatasetSpec]) -> list[dict[str, dict[str, str]]]:
    """One {item id: {question key: text}} per dataset from a JSONL file (one record per item id).

    A record names its dataset with `benchmark` (a dataset name) when the config has several datasets."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"predictions file {str(path)!r} does not exist")
    names = [ds.name for ds in datasets]
    out: list[dict[str, dict[str, str]]] = [{} for _ in datasets]
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: not a JSON object") from None
        if not isinstance(rec, dict) or rec.get("id") is None:
            raise ValueError(f"{where}: a record needs an 'id'")
        name = rec.get("benchmark")
        if name is None and len(datasets) > 1:
            raise ValueError(f"{where}: no 'benchmark' key, and the config has several datasets {names}")
        index = 0 if name is None else (names.index(name) if name in names else -1)
        if index < 0:
            raise ValueError(f"{where}: benchmark {name!r} is not among the config's datasets {names}")
        item_id = str(rec["id"])
        if item_id in out[index]:
            raise ValueError(f"{where}: a second record for id {item_id!r}")
        keys = get_benchmark(datasets[index].name).question_keys
        out[index][item_id] = _responses_of(rec, keys, where)
    return out


def score_predictions_file(
    cfg: BenchmarkConfig, path: str | Path, *, print_report: bool = True
) -> dict[str, Any]:
    """Score predictions made elsewhere (no model, no Ray) with the pipeline's scoring, judge and report."""
    start = time.perf_counter()
    given = read_predictions(path, cfg.datasets)
    loaded = _load_all(cfg)
    label = f"predictions:{Path(path).name}"
    runs = []
    judges = _JudgeFactory(cfg)
    for ds, responses in zip(cfg.datasets, given, strict=True):
        t0 = time.perf_counter()
        bench = get_benchmark(ds.name)(ds)
        data = loaded[_load_key(ds)]
        items = {it.id: it for it in data.items}
        run_dir = Path(cfg.output_dir) / f"{_slug(label)}__{_slug(ds.name + '-' + ds.split)}"
        ctx = ScoreContext(cfg.mc_parse, judges.make(ds, bench))
        scorer = _Scorer(bench, items, ctx, run_dir / RESULTS_FILE, _EvalMetrics(label, ds.name))
        for doc_id, item in enumerate(data.items):
            if item.id in responses:
                rec = {"id": item.id, "doc_id": doc_id, "prompts": item.prompts, "model_inputs": item.prompts}
                scorer.submit({**rec, "responses": responses[item.id], "error": ""})
        scorer.finish()
        failed = {i: "no prediction" for i in items if i not in responses}
        failed.update(scorer.errors)
        ordered = [scorer.records[i] for i in items if i in scorer.records]
        _rewrite_sorted(run_dir / RESULTS_FILE, ordered)
        run = run_metrics(cfg, bench, data, ordered, failed, ctx.judge, run_dir)
        unknown = sorted(set(responses) - set(items))
        if unknown:
            log.warning(
                "%d prediction ids are not items of %s (first: %s)", len(unknown), ds.name, unknown[0]
            )
        run["counts"]["unknown_ids"] = len(unknown)
        run.update(
            model=label, model_name="", model_path=str(path), adapter_path=None, resolution=None,
            prediction_error="",
        )
        run["timing"] = {
            "wall_s": time.perf_counter() - t0,
            "predict_s": 0.0,
            "predicted_this_run": 0,
            "resumed": 0,
            "items_per_s": None,
            "generate_s": 0.0,
            "items_per_generate_s": None,
        }
        runs.append(run)
    return _finish(cfg, runs, start, print_report)
