"""`otterhd finetune` ≡ `python -m otterhd_ray.finetune` ≡ `python jobs/finetune.py` (the Ray job entry point).

Inside a Ray job RAY_ADDRESS is set, so the run joins that cluster; run directly, it starts a local Ray. Prints one
JSON line with the outcome (`final metrics`, `checkpoint`, `hf_export`, with LoRA `adapter_export`); exit code 0 on
success, 1 when training failed, 2 for a config or input mistake.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otterhd_ray.config import ConfigError, FinetuneConfig, load_finetune_config

logger = logging.getLogger("otterhd_ray.finetune")


@dataclass
class FinetuneOutcome:
    result: Any  # Ray Train's `Result` (`.checkpoint`, `.metrics`, `.error`) or the in-process equivalent
    hf_dir: Path | None  # the `train.save_hf_model` export, when one was written
    metrics_history: Path
    adapter_dir: Path | None = None  # with `lora.enabled`: the same export's PEFT adapter directory


def finetune(cfg: FinetuneConfig) -> FinetuneOutcome:
    """`train.demo_data` (synthesise missing demo inputs), train, then `train.save_hf_model` (export the final
    checkpoint to `train.output_dir/hf`; a LoRA run merged there, and its adapter alone in PEFT format in
    `train.output_dir/adapter`). Export and demo data live above `train/`, so they run here."""
    from otterhd_ray.train.trainer import resolve_paths, run_finetune

    cfg = resolve_paths(cfg)
    if cfg.train.demo_data:
        from otterhd_ray.demo import ensure_demo_data

        ensure_demo_data(cfg)
    result = run_finetune(cfg)
    hf_dir = adapter_dir = None
    if cfg.train.save_hf_model and result.checkpoint is not None:
        from otterhd_ray.export import export_checkpoint

        hf_dir = Path(cfg.train.output_dir) / "hf"
        with result.checkpoint.as_directory() as directory:
            export_checkpoint(directory, hf_dir)
            if cfg.lora.enabled:
                adapter_dir = export_checkpoint(directory, Path(cfg.train.output_dir) / "adapter", adapter_only=True)
        logger.info("exported the final checkpoint to %s%s", hf_dir, f" and {adapter_dir}" if adapter_dir else "")
    return FinetuneOutcome(result, hf_dir, Path(cfg.train.output_dir) / "metrics.jsonl", adapter_dir)


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

    try:
        outcome = finetune(cfg)
    except ValueError as err:  # user mistakes found on the driver (paths, sizes): no traceback
        print(f"finetune: {err}", file=sys.stderr)
        return 2
    result = outcome.result
    summary = {
        "status": "failed" if result.error else "succeeded",
        "checkpoint": getattr(result.checkpoint, "path", None),
        "hf_export": str(outcome.hf_dir) if outcome.hf_dir else None,
        **({"adapter_export": str(outcome.adapter_dir)} if outcome.adapter_dir else {}),
        "metrics_history": str(outcome.metrics_history),
        "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float | str)},
    }
    print(json.dumps(summary, default=str))
    if result.error:
        print(f"finetune: training failed: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
