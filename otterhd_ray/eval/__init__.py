"""Evaluation: benchmarks (eval/benchmarks/, one module each), MC scoring, judge, predictor actors, pipeline,
report (ours + lmms-eval's files).

`run_evaluation(cfg)` is the entry point (`otterhd evaluate`, `otterhd demo`); see `eval/pipeline.py`.
`eval.benchmarks.score_predictions` scores responses without Ray (a training worker, `--predictions`).
"""

from __future__ import annotations

from typing import Any


def run_evaluation(cfg: Any, **kwargs: Any) -> dict[str, Any]:
    """Evaluate every model x dataset of a `BenchmarkConfig`; returns the metrics (also written to disk)."""
    from otterhd_ray.eval.pipeline import run_evaluation as _run  # lazy: keep the package import light

    return _run(cfg, **kwargs)


__all__ = ["run_evaluation"]
