"""`python -m otterhd_ray.evaluate --config benchmark.yaml [key.path=value ...]`

The seed's entry point (`python -m pipeline.benchmarks.evaluate --confg benchmark.yaml`, its README's typo)
works with either spelling. Exit status: 0 done, 1 a run stopped early (rerun continues it), 2 config / input error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from otterhd_ray.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otterhd evaluate", description="MagnifierBench evaluation on Ray")
    p.add_argument("--config", "--confg", "-c", dest="config", required=True, help="benchmark YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. num_actors=2 judge.concurrency=16")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from otterhd_ray.eval.config import load_benchmark_config
    from otterhd_ray.eval.pipeline import run_evaluation

    try:
        cfg = load_benchmark_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"otterhd evaluate: {err}", file=sys.stderr)
        return 2
    try:
        metrics = run_evaluation(cfg)
    except ValueError as err:  # a user mistake found before the run (missing model or data)
        print(f"otterhd evaluate: {err}", file=sys.stderr)
        return 2
    # 1: some run stopped early (its finished items are on disk; rerunning continues).
    return 1 if any(run.get("prediction_error") for run in metrics["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
