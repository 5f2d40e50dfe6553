"""Evaluation report: metrics.json (machine-readable) and report.md (a table per model x dataset)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def format_report(metrics: dict[str, Any]) -> str:
    """Markdown: a summary table, then per-run counts, judge and timing details."""
    runs = metrics.get("runs", [])
    lines = ["# MagnifierBench evaluation", ""]
    lines += [
        "| model | dataset | MC acc | free-form acc | items | judge | items/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {_pct(r['mc_accuracy'])} | {_pct(r['ff_accuracy'])} "
            f"| {r['counts']['evaluated']} | {r['judge']['kind']} ({r['judge']['model']}) "
            f"| {_num(r['timing']['items_per_s'])} |"
        )
    for r in runs:
        c, j, t = r["counts"], r["judge"], r["timing"]
        lines += ["", f"## {r['model']} on {r['dataset']}", ""]
        lines.append(
            f"- model path: `{r['model_path']}`, resolution {r['resolution']}, MC parsing `{r['mc_parse']}`"
        )
        lines.append(
            f"- items: {c['rows']} rows, {c['evaluated']} evaluated, {c['failed']} failed "
            f"(prediction error), skipped {c['skipped']} {_fmt_reasons(c['skipped_by_reason'])}"
        )
        lines.append(
            f"- multiple choice: {c['mc_correct']} correct, {c['parsed']} parsed, {c['unparsed']} unparsed "
            f"(unparsed count as wrong) -> {_pct(r['mc_accuracy'])}"
        )
        lines.append(
            f"- free form: {c['ff_correct']} correct of {c['judged']} judged, {c['unjudged']} unjudged "
            f"(excluded, never counted wrong) -> {_pct(r['ff_accuracy'])}"
        )
        judge_line = f"- judge: {j['kind']} ({j['model']})"
        if j["kind"] == "openai":
            judge_line += (
                f", {j['requests']} requests, {j['retries']} retries {_fmt_reasons(j['retry_reasons'])}, "
                f"{j['cache_hits']} cache hits, {j['prompt_tokens']} + {j['completion_tokens']} tokens, "
                f"estimated ${j['estimated_cost_usd']:.4f}"
            )
        else:
            judge_line += ": no API key, normalised match of the response to the correct option's text"
        lines.append(judge_line)
        lines.append(
            f"- time: {_num(t['wall_s'], '{:.1f}')} s total, {t['predicted_this_run']} items predicted this run "
            f"in {_num(t['predict_s'], '{:.1f}')} s ({_num(t['items_per_s'])} items/s incl. actor start-up), "
            f"{t['resumed']} resumed from an earlier run; {_num(t.get('items_per_generate_s'))} items/s per actor "
            "inside generate"
        )
        if r.get("per_kind"):
            kinds = ", ".join(f"{k} {_pct(v['mc_accuracy'])} of {v['items']}" for k, v in r["per_kind"].items())
            lines.append(f"- multiple choice per question kind: {kinds}")
        lines.append(f"- per-item results: `{r['results_path']}`")
        if r.get("prediction_error"):
            lines.append(
                f"- **prediction stopped early**: {r['prediction_error']} -- finished items are kept; "
                "rerun the same config to continue"
            )
    return "\n".join(lines) + "\n"


def _fmt_reasons(reasons: dict[str, int]) -> str:
    return "(" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")" if reasons else ""


def _per_kind_chart(metrics: dict[str, Any], out: Path) -> Path | None:
    """per_kind.png when some run has question kinds; a failed figure never fails the evaluation."""
    if not any(r.get("per_kind") for r in metrics.get("runs", [])):
        return None
    try:
        from otterhd_ray.plots import PER_KIND_PNG, plot_per_kind

        return plot_per_kind(metrics, out / PER_KIND_PNG)
    except Exception as err:  # noqa: BLE001 (matplotlib missing, ...): the numbers are in the report anyway
        log.warning("no per-kind chart (%s: %s)", type(err).__name__, err)
        return None


def write_report(out_dir: str | Path, metrics: dict[str, Any], extra_path: str | Path | None = None) -> str:
    """Write metrics.json and report.md under `out_dir` (and the report to `extra_path`); return the text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    text = format_report(metrics)
    chart = _per_kind_chart(metrics, out)
    if chart:
        text += f"\n![multiple-choice accuracy per question kind]({chart.name})\n"
    (out / "report.md").write_text(text)
    if extra_path:
        Path(extra_path).parent.mkdir(parents=True, exist_ok=True)
        Path(extra_path).write_text(text)
    return text
