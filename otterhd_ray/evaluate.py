"""`python -m otterhd_ray.evaluate --config benchmark.yaml [key.path=value ...]`

The seed's entry point (`python -m pipeline.benchmarks.evaluate --confg benchmark.yaml`, its README's typo)
works with either spelling. `--predictions FILE` scores predictions made elsewhere (one JSONL record per item
id) with the same metrics and no model: the datasets come from `--config` or from `--benchmark NAME
[--data-path P] [--split S]`.

Exit status: 0 done; 1 a run stopped early (rerun continues it); 2 config / input error; 3 the judge stopped
on a failure that cannot heal (a bad key: fix it and rerun, only the judging is left).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from otterhd_ray.config import ConfigError

EXIT_STOPPED, EXIT_INPUT, EXIT_JUDGE = 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otterhd evaluate", description="Benchmark evaluation on Ray")
    p.add_argument("--config", "--confg", "-c", dest="config", help="benchmark YAML")
    p.add_argument("--predictions", help="score this JSONL of predictions (no model): {id, response(s)}")
    p.add_argument("--benchmark", help="with --predictions and no --config: the benchmark's name")
    p.add_argument(
        "--data-path", help="with --benchmark: local HF dataset dir or hub id (default: its hub id)"
    )
    p.add_argument("--split", help="with --benchmark: the split (default: the benchmark's)")
    p.add_argument("--output-dir", help="where the report goes (default: the config's output_dir)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. num_actors=2 judge.concurrency=16")
    return p


def _load(args: argparse.Namespace) -> object:
    from otterhd_ray.config import deep_merge, parse_overrides, validate_config
    from otterhd_ray.eval.config import BenchmarkConfig, load_benchmark_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.config:
        if args.benchmark:
            raise ConfigError("give either --config or --benchmark, not both")
        return load_benchmark_config(args.config, overrides)
    if not (args.predictions and args.benchmark):
        raise ConfigError("--config is required (or --predictions FILE with --benchmark NAME)")
    dataset = {"name": args.benchmark, "data_path": args.data_path or "", "split": args.split or ""}
    raw = deep_merge({"datasets": [dataset]}, parse_overrides(overrides) if overrides else {})
    return validate_config(BenchmarkConfig, raw, "<command line>")


def exit_status(metrics: dict) -> int:
    runs = metrics["runs"]
    if any(run.get("judge_error") for run in runs):
        return EXIT_JUDGE
    return EXIT_STOPPED if any(run.get("prediction_error") for run in runs) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from otterhd_ray.eval.pipeline import run_evaluation, score_predictions_file

    try:
        cfg = _load(args)
    except (ConfigError, ValueError) as err:
        print(f"otterhd evaluate: {err}", file=sys.stderr)
        return EXIT_INPUT
    try:
        if args.predictions:
            metrics = score_predictions_file(cfg, args.predictions)
        else:
            metrics = run_evaluation(cfg)
    except ValueError as err:  # a user mistake found before the run (missing model, data or predictions)
        print(f"otterhd evaluate: {err}", file=sys.stderr)
        return EXIT_INPUT
    return exit_status(metrics)


if __name__ == "__main__":
    sys.exit(main())
