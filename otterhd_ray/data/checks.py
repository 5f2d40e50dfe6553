"""Pre-flight checks of the training data, on the driver, before any worker starts.

Without them a corrupt shard killed every Ray Train worker with pages of `ArrowInvalid: Parquet magic bytes not
found` and never named the file; a wrong-schema file trained as N `missing_id` rejects and exited 0; a dataset
with no usable row surfaced as a worker traceback `epoch 0 has no micro-batches`. Here each becomes one line:

- every shard file's footer is read and its columns checked (`REQUIRED_COLUMNS`); a bad file is an error naming
  it (`data.on_bad_file: error`, the default) or is left out and counted (`skip`: added to the dataset's
  `exclude` list, which the pipeline honours);
- the length index is built (cached: the workers reuse it) and the epoch scheduled; a dataset with zero usable
  rows is an error naming the dataset and its reject reasons.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from otterhd_ray.config import DataConfig
from otterhd_ray.data.shards import list_shard_files, open_parquet_named

logger = logging.getLogger("otterhd_ray.data")

REQUIRED_COLUMNS = ("id", "image", "conversations")


@dataclass
class DataCheck:
    """What the checks found: bad files (path -> problem) and accepted / rejected samples per dataset."""

    bad_files: dict[str, str] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)
    accepted: Counter = field(default_factory=Counter)
    rejects: dict[str, Counter] = field(default_factory=dict)


def file_problem(path: str) -> str | None:
    """Why shard file `path` cannot be trained on (unreadable footer, missing columns), or None."""
    try:
        with open_parquet_named(path) as pf:
            names = pf.schema_arrow.names
    except ValueError as err:
        return str(err)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        return f"missing columns {missing} in {path} (has {names}; shard schema: otterhd_ray/data/shards.py)"
    return None


def check_files(cfg: DataConfig, report: DataCheck) -> DataConfig:
    """Footer + schema of every file of the mix; returns `cfg` with bad files excluded (`skip`) or raises."""
    cfg = cfg.model_copy(deep=True)
    for spec in cfg.datasets:
        bad = []
        for path in list_shard_files(spec.path, spec.exclude):
            problem = file_problem(path)
            if problem is not None:
                report.bad_files[path] = problem if path in problem else f"{path}: {problem}"
                bad.append(path)
        if bad and cfg.on_bad_file == "skip":
            spec.exclude = [*spec.exclude, *bad]
            report.skipped_files += bad
    if report.bad_files and cfg.on_bad_file == "error":
        first, *more = report.bad_files.values()
        extra = f" (and {len(more)} more bad file(s))" if more else ""
        raise ValueError(f"{first}{extra}; fix or remove it, or set data.on_bad_file=skip")
    for path in report.skipped_files:
        logger.warning("data.on_bad_file=skip: leaving out %s", report.bad_files[path])
    return cfg


def check_usable(cfg: DataConfig, tokenizer_dir: str, world_size: int, report: DataCheck) -> None:
    """Index + schedule epoch 0 as the workers will; a dataset without one usable row is an error."""
    from otterhd_ray.data.pipeline import load_index, schedule_epoch

    for spec in cfg.datasets:  # per file, so an unreadable row group is attributed to its file
        for path in list_shard_files(spec.path, spec.exclude):
            try:
                load_index(cfg, tokenizer_dir, [path])
            except (pa.ArrowException, OSError) as err:
                raise ValueError(f"{path}: unreadable while indexing ({type(err).__name__}: {err})") from None
    schedule = schedule_epoch(cfg, tokenizer_dir, 0, world_size)
    for mb in schedule.micro_batches:
        report.accepted.update(schedule.sample_source[i] for i in mb.tolist())
    for r in schedule.plan_rejects:
        report.rejects.setdefault(r["source"], Counter())[r["reason"]] += 1
    for spec in cfg.datasets:
        if report.accepted[spec.name] == 0:
            reasons = report.rejects.get(spec.name, Counter())
            why = ", ".join(f"{r}={n}" for r, n in reasons.most_common()) or "no rows"
            raise ValueError(f"dataset {spec.name!r} ({spec.path}) has no usable rows: {why}")


def check_data(cfg: DataConfig, tokenizer_dir: str | None, world_size: int = 1) -> tuple[DataConfig, DataCheck]:
    """All pre-flight checks (files; then, with a tokenizer, usable rows). Returns the config to train with
    (bad files excluded when `on_bad_file: skip`) and the report; ValueError (one line) to refuse the run."""
    report = DataCheck()
    cfg = check_files(cfg, report)
    if tokenizer_dir is not None:
        check_usable(cfg, str(tokenizer_dir), world_size, report)
    return cfg, report


def preflight(cfg: Any, world_size: int) -> Any:
    """The driver's call (`train/trainer.py`): a copy of the FinetuneConfig `cfg` whose data section excludes
    skipped bad files; raises ValueError naming the file or dataset otherwise."""
    data, report = check_data(cfg.data, cfg.data.tokenizer_path, world_size)
    if report.skipped_files:
        logger.warning("skipped %d bad shard file(s) (data.on_bad_file=skip)", len(report.skipped_files))
    out = cfg.model_copy(deep=True)
    out.data = data
    return out
