"""Evaluation report: metrics.json (machine-readable), report.md (one summary table across benchmarks, then
each run's counts, breakdowns, judge and timing) and lmms-eval's results / samples files (`lmms_output.py`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from otterhd_ray.eval.lmms_output import write_lmms_eval

log = logging.getLogger(__name__)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _fmt_reasons(reasons: dict[str, int]) -> str:
    return "(" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")" if reasons else ""


def summary_table(runs: list[dict[str, Any]]) -> list[str]:
    """One row per model x dataset: the benchmark's headline numbers (its official metric)."""
    lines = [
        "| model | benchmark | result | items | unjudged | judge | items/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        result = ", ".join(f"{name} {value}" for name, value in r["headline"])
        judge = (
            r["judge"]["kind"]
            if r["judge"]["kind"] == "none"
            else f"{r['judge']['kind']} ({r['judge']['model']})"
        )
        lines.append(
            f"| {r['model']} | {r['dataset']} | {result} | {r['counts']['evaluated']} | {r['counts']['unjudged']} "
            f"| {judge} | {_num(r['timing']['items_per_s'])} |"
        )
    return lines


def _breakdown_lines(breakdown: dict[str, Any]) -> list[str]:
    """Tables of {name: {metric: value}} breakdowns (MME subtasks, POPE categories, MMBench categories, ...)."""
    lines: list[str] = []
    for title, table in breakdown.items():
        if not isinstance(table, dict) or not table or not all(isinstance(v, dict) for v in table.values()):
            continue
        cols = [c for c in next(iter(table.values())) if c not in ("tp", "fp", "tn", "fn")]
        lines += ["", f"{title.replace('_', ' ')}:", "", "| name | " + " | ".join(cols) + " |"]
        lines.append("|---" * (len(cols) + 1) + "|")
        for name, row in table.items():
            cells = [_cell(c, row.get(c)) for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _cell(col: str, value: Any) -> str:
    if isinstance(value, float):
        fraction = col in ("accuracy", "precision", "recall", "f1", "yes_ratio")
        return _pct(value) if fraction else f"{value:.1f}"
    return "n/a" if value is None else str(value)


def _judge_line(r: dict[str, Any]) -> str:
    j = r["judge"]
    line = f"- judge: {j['kind']} ({j['model']})"
    if j["kind"] == "openai":
        line += (
            f", {j['requests']} requests, {j['retries']} retries {_fmt_reasons(j['retry_reasons'])}, "
            f"{j['cache_hits']} cache hits, {j['prompt_tokens']} + {j['completion_tokens']} tokens, "
            f"estimated ${j['estimated_cost_usd']:.4f}"
        )
    elif r["benchmark"] == "magnifierbench":
        line += ": no API key, normalised match of the response to the correct option's text"
    else:
        line += ": no API key, a rule stands in for the GPT judge (numbers are not the official metric)"
    return line


def _magnifierbench_lines(r: dict[str, Any]) -> list[str]:
    c = r["counts"]
    return [
        f"- multiple choice: {c['mc_correct']} correct, {c['parsed']} parsed, {c['unparsed']} unparsed "
        f"(unparsed count as wrong) -> {_pct(r['mc_accuracy'])}",
        f"- free form: {c['ff_correct']} correct of {c['judged']} judged, {c['unjudged']} unjudged "
        f"(excluded, never counted wrong) -> {_pct(r['ff_accuracy'])}",
    ]


def run_lines(r: dict[str, Any]) -> list[str]:
    c, t = r["counts"], r["timing"]
    lines = ["", f"## {r['model']} on {r['dataset']}", ""]
    lines.append(
        f"- model path: `{r['model_path']}`, resolution {r['resolution']}, MC parsing `{r['mc_parse']}`"
    )
    lines.append(
        f"- items: {c['rows']} rows, {c['evaluated']} evaluated, {c['failed']} failed "
        f"(prediction error), skipped {c['skipped']} {_fmt_reasons(c['skipped_by_reason'])}"
    )
    if r["benchmark"] == "magnifierbench":
        lines += _magnifierbench_lines(r)
    else:
        scores = ", ".join(f"`{k}` {_num(v)}" for k, v in r["scores"].items())
        lines.append(f"- {', '.join(f'{n} {v}' for n, v in r['headline'])} (results.json: {scores})")
        if r["judge"]["kind"] != "none":
            lines.append(f"- {c['judged']} judged, {c['unjudged']} unjudged (excluded, never counted wrong)")
    if r["judge"]["kind"] != "none":
        lines.append(_judge_line(r))
    if r.get("judge_error"):
        lines.append(
            f"- **judging stopped**: {r['judge_error']} -- {c['unjudged']} items unjudged for this reason; the "
            "predictions are kept: rerun the same config with a working key and only the judging is done"
        )
    elif c.get("unjudged_by_reason"):
        lines.append(f"- unjudged because: {_fmt_reasons(c['unjudged_by_reason'])}")
    lines.append(
        f"- time: {_num(t['wall_s'], '{:.1f}')} s total, {t['predicted_this_run']} items predicted this run "
        f"in {_num(t['predict_s'], '{:.1f}')} s ({_num(t['items_per_s'])} items/s incl. actor start-up), "
        f"{t['resumed']} resumed from an earlier run; {_num(t.get('items_per_generate_s'))} items/s per actor "
        "inside generate"
    )
    lines.append(f"- per-item results: `{r['results_path']}`")
    if r.get("prediction_error"):
        lines.append(
            f"- **prediction stopped early**: {r['prediction_error']} -- finished items are kept; "
            "rerun the same config to continue"
        )
    return lines + _breakdown_lines(r.get("breakdown") or {})


def format_report(metrics: dict[str, Any]) -> str:
    """Markdown: the summary table across benchmarks, then per-run details."""
    runs = metrics.get("runs", [])
    lines = ["# Evaluation report", "", *summary_table(runs)]
    for r in runs:
        lines += run_lines(r)
    if metrics.get("lmms_eval_files"):
        lines += ["", "lmms-eval format: " + ", ".join(f"`{p}`" for p in metrics["lmms_eval_files"])]
    return "\n".join(lines) + "\n"


def _per_kind_chart(metrics: dict[str, Any], out: Path) -> Path | None:
    """per_kind.png when some run has question kinds; a failed figure never fails the evaluation."""
    if not any((r.get("breakdown") or {}).get("question_kinds") for r in metrics.get("runs", [])):
        return None
    try:
        from otterhd_ray.plots import PER_KIND_PNG, plot_per_kind

        return plot_per_kind(metrics, out / PER_KIND_PNG)
    except Exception as err:  # noqa: BLE001 (matplotlib missing, ...): the numbers are in the report anyway
        log.warning("no per-kind chart (%s: %s)", type(err).__name__, err)
        return None


def write_report(out_dir: str | Path, metrics: dict[str, Any], extra_path: str | Path | None = None) -> str:
    """Write the lmms-eval files, metrics.json and report.md under `out_dir` (and the report to
    `extra_path`); return the report text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics["lmms_eval_files"] = [str(p) for p in write_lmms_eval(out / "lmms_eval", metrics)]
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")
    text = format_report(metrics)
    chart = _per_kind_chart(metrics, out)
    if chart:
        text += f"\n![multiple-choice accuracy per question kind]({chart.name})\n"
    (out / "report.md").write_text(text)
    if extra_path:
        Path(extra_path).parent.mkdir(parents=True, exist_ok=True)
        Path(extra_path).write_text(text)
    return text
