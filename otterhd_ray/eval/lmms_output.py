"""lmms-eval's output files beside our report, so its dashboards and comparison scripts read our runs.

Layout and key names as lmms-eval writes them (`lmms_eval/loggers/evaluation_tracker.py`, `evaluator.py`):

    <output_dir>/lmms_eval/<model_sanitized>/<YYYYMMDD_HHMMSS>_results.json
    <output_dir>/lmms_eval/<model_sanitized>/<YYYYMMDD_HHMMSS>_samples_<task>.jsonl

`model_sanitized` is the model path's last two parts joined by "__". results.json holds `results`
{task: {alias, "<metric>,none", "<metric>_stderr,none": "N/A"}}, group_subtasks, configs, versions, n-shot,
higher_is_better, n-samples, config, git_hash, date, model_name, start/end time and
total_evaluation_time_seconds. A sample line holds doc_id, doc_hash, target, input (the prompt),
filtered_resps, and the task's per-sample metric values (`resps` is left out when equal to filtered_resps,
as lmms-eval does; we apply no filters, so it always is). Metric values use lmms-eval's scales (MME sums,
POPE / SEED-Bench / ScienceQA fractions, MMBench / MathVista / MM-Vet percentages).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from otterhd_ray.eval.benchmarks import get_benchmark
from otterhd_ray.eval.config import BenchDatasetSpec

TEMPLATE_VERSION = 0.0


def sanitize_model_name(model_path: str) -> str:
    parts = [p for p in str(model_path).replace("\\", "/").split("/") if p and p != "."]
    return "__".join(parts[-2:]) or "model"


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample_line(bench: Any, rec: dict[str, Any]) -> dict[str, Any]:
    """One lmms-eval sample from one of our scored records."""
    first = next(iter(rec.get("model_inputs") or {"": ""}))
    response = (rec.get("responses") or {}).get(first, "")
    line = {
        "doc_id": rec.get("doc_id"),
        "doc_hash": hashlib.sha256(
            json.dumps(rec.get("doc"), sort_keys=True, default=str).encode()
        ).hexdigest(),
        "target": str(rec.get("target", "")),
        "input": (rec.get("model_inputs") or {}).get(first, ""),
        "filtered_resps": [response],
        "item_id": rec["id"],
    }
    if len(rec.get("responses") or {}) > 1:  # MagnifierBench: the second (free-form) question too
        line["all_resps"] = rec["responses"]
    line.update(bench.sample_metrics(rec))
    return line


def _task_block(run: dict[str, Any], bench: Any, task: str, cfg: dict[str, Any]) -> dict[str, Any]:
    metrics = list(run["scores"])
    return {
        "results": {
            task: {
                "alias": task,
                **{f"{m},none": run["scores"][m] for m in metrics},
                **{f"{m}_stderr,none": "N/A" for m in metrics},
            }
        },
        "configs": {
            task: {
                "task": task,
                "dataset_path": run["data_path"],
                "dataset_name": bench.spec.config,
                "test_split": bench.spec.split,
                "output_type": "generate_until",
                "generation_kwargs": {
                    "max_new_tokens": run.get("max_new_tokens"),
                    "temperature": 0,
                    "do_sample": False,
                    "num_beams": 1,
                },
                "metric_list": [{"metric": m, "higher_is_better": True} for m in metrics],
            }
        },
        "higher_is_better": {task: dict.fromkeys(metrics, True)},
        "n-samples": {task: {"original": run["counts"]["usable"], "effective": run["counts"]["evaluated"]}},
    }


def write_lmms_eval(out_dir: Path, metrics: dict[str, Any]) -> list[Path]:
    """Write one results.json per model and one samples file per task; return the written paths."""
    cfg = metrics.get("config") or {}
    now = datetime.datetime.now()
    stamp = now.strftime("%Y%m%d_%H%M%S")
    written: list[Path] = []
    by_model: dict[str, list[dict[str, Any]]] = {}
    for run in metrics.get("runs", []):
        by_model.setdefault(run["model_path"], []).append(run)
    datasets = {f"{d['name']}/{d.get('split')}": d for d in cfg.get("datasets", [])}
    for model_path, runs in by_model.items():
        folder = out_dir / sanitize_model_name(model_path)
        folder.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {
            k: {}
            for k in (
                "results",
                "group_subtasks",
                "configs",
                "versions",
                "n-shot",
                "higher_is_better",
                "n-samples",
            )
        }
        wall = 0.0
        for run in runs:
            spec = BenchDatasetSpec.model_validate(datasets.get(run["dataset"], {"name": run["benchmark"]}))
            bench = get_benchmark(run["benchmark"])(spec)
            task = bench.task if bench.task not in doc["results"] else f"{bench.task}_{spec.split}"
            for key, block in _task_block(run, bench, task, cfg).items():
                doc[key].update(block)
            doc["group_subtasks"][task] = []
            doc["versions"][task] = TEMPLATE_VERSION
            doc["n-shot"][task] = 0
            wall += float(run["timing"]["wall_s"] or 0.0)
            samples = folder / f"{stamp}_samples_{task}.jsonl"
            with samples.open("w") as f:
                for rec in _read_jsonl(Path(run["results_path"])):
                    f.write(json.dumps(sample_line(bench, rec), default=str) + "\n")
            written.append(samples)
        first = runs[0]
        doc["config"] = {
            "model": "otterhd_ray",
            "model_args": f"pretrained={model_path},prompt_style={first.get('model_name')},"
            f"resolution={first.get('resolution')}",
            "batch_size": cfg.get("batch_size"),
            "device": cfg.get("device"),
            "limit": None,
            "gen_kwargs": "",
            "random_seed": 0,
        }
        doc.update(
            git_hash=_git_hash(),
            date=stamp,
            model_name=model_path,
            model_name_sanitized=sanitize_model_name(model_path),
            start_time=(now - datetime.timedelta(seconds=wall)).isoformat(),
            end_time=now.isoformat(),
            total_evaluation_time_seconds=f"{wall:.2f}",
        )
        results = folder / f"{stamp}_results.json"
        results.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        written.insert(0, results)
    return written
