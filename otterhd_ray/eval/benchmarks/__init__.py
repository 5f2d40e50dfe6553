"""Benchmark registry: one module per benchmark in this package, found by name.

A new benchmark is one file here: a `Benchmark` subclass decorated with `@register`. Every module of the
package is imported on first lookup, so nothing else needs an edit.

    bench = get_benchmark("mme")(spec)          # spec: a BenchDatasetSpec
    loaded = bench.load()                       # items (prompts, target, doc) + counted skips
    records, agg = score_predictions(bench, loaded, {item_id: {"answer": "Yes"}})
"""

from __future__ import annotations

import importlib
import pkgutil

from otterhd_ray.eval.benchmarks.base import (
    Aggregate,
    Benchmark,
    Item,
    LoadResult,
    ScoreContext,
    format_for_model,
    score_predictions,
    score_records,
)

BENCHMARKS: dict[str, type[Benchmark]] = {}
_discovered = False


def register(cls: type[Benchmark]) -> type[Benchmark]:
    """Class decorator: make a benchmark available under `cls.name`."""
    if cls.name in BENCHMARKS and BENCHMARKS[cls.name] is not cls:
        raise ValueError(f"two benchmarks named {cls.name!r}: {BENCHMARKS[cls.name]} and {cls}")
    BENCHMARKS[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    _discovered = True


def benchmark_names() -> list[str]:
    _discover()
    return sorted(BENCHMARKS)


def get_benchmark(name: str) -> type[Benchmark]:
    _discover()
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(sorted(BENCHMARKS))}")
    return BENCHMARKS[name]


__all__ = [
    "Aggregate",
    "BENCHMARKS",
    "Benchmark",
    "Item",
    "LoadResult",
    "ScoreContext",
    "benchmark_names",
    "format_for_model",
    "get_benchmark",
    "register",
    "score_predictions",
    "score_records",
]
