"""`otterhd finetune` ≡ `python -m otterhd_ray.finetune` ≡ `python jobs/finetune.py` (the Ray job entry point).

Inside a Ray job RAY_ADDRESS is set, so the run joins that cluster; run directly, it starts a local Ray. Prints one
JSON line with the outcome (`final metrics`, `checkpoint`, `hf_export`); exit code 0 on success, 1 when training
failed, 2 for a config or input mistake.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from otterhd_ray.config import ConfigError, load_finetune_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "--confg", dest="config", required=True, help="finetune YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ray.num_workers=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = load_finetune_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"finetune: {err}", file=sys.stderr)
        return 2

    from otterhd_ray.train.trainer import resolve_paths, run_finetune

    try:
        result = run_finetune(cfg)
    except ValueError as err:  # user mistakes found on the driver (paths, sizes): no traceback
        print(f"finetune: {err}", file=sys.stderr)
        return 2
    resolved = resolve_paths(cfg)
    hf_dir = Path(resolved.train.output_dir) / "hf"
    summary = {
        "status": "failed" if result.error else "succeeded",
        "checkpoint": getattr(result.checkpoint, "path", None),
        "hf_export": str(hf_dir) if resolved.train.save_hf_model and hf_dir.is_dir() else None,
        "metrics_history": str(Path(resolved.train.output_dir) / "metrics.jsonl"),
        "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float | str)},
    }
    print(json.dumps(summary, default=str))
    if result.error:
        print(f"finetune: training failed: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
