"""cluster/grafana/otterhd_dashboard.json: importable as is, and every query names a metric that exists.

Ray exports a `ray.util.metrics` metric called `otterhd_train_loss` to Prometheus as `ray_otterhd_train_loss`
(gauges), a counter `otterhd_eval_judge_requests` as `ray_otterhd_eval_judge_requests_total`, and a counter
already named `otterhd_train_tokens_total` as `ray_otterhd_train_tokens_total` (no second suffix). Checked by
scraping Ray 2.60's metrics endpoint; tests/integration/test_ops_jobs.py checks the real jobs' names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "otterhd_dashboard.json"

# What the training and evaluation code report through ray.util.metrics (name -> kind).
APP_METRICS = {
    **{f"otterhd_train_{n}": "gauge" for n in (
        "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "data_wait_fraction", "step")},
    # otterhd_ray/train/metrics.py names its counters with the suffix already.
    "otterhd_train_tokens_total": "counter",
    "otterhd_train_samples_total": "counter",
    "otterhd_train_eval_score": "gauge",  # train/evaluation.py through MetricsSink.log_eval
    "otterhd_eval_items_done": "counter",
    "otterhd_eval_items_per_s": "gauge",
    "otterhd_eval_judge_requests": "counter",
    "otterhd_eval_judge_retries": "counter",
    "otterhd_eval_judge_failures": "counter",
    # otterhd_ray/serve/metrics.py
    "otterhd_serve_requests": "counter",
    "otterhd_serve_errors": "counter",
    "otterhd_serve_tokens": "counter",
    "otterhd_serve_queue_depth": "gauge",
    "otterhd_serve_ttft_s": "histogram",
    "otterhd_serve_batch_size": "histogram",
}
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# Ray's own node metrics the dashboard also plots.
RAY_SYSTEM_METRICS = {"ray_node_gpus_utilization", "ray_node_gram_used", "ray_node_cpu_utilization"}
PROMQL_FUNCTIONS = {"sum", "avg", "max", "min", "rate", "increase", "by", "on", "label_values", "histogram_quantile"}


def exported_name(name: str, kind: str) -> str:
    """Prometheus name of a ray.util.metrics metric: `ray_` prefix; counters end in `_total` (added once).
    A histogram is exported as `<name>_bucket`, `_sum` and `_count` series (tests/integration/test_serve_app.py
    scrapes them)."""
    if kind == "counter" and not name.endswith("_total"):
        return f"ray_{name}_total"
    return f"ray_{name}"


def exported_series(name: str, kind: str) -> set[str]:
    base = exported_name(name, kind)
    return {base + s for s in HISTOGRAM_SERIES} if kind == "histogram" else {base}


KNOWN = {s for n, k in APP_METRICS.items() for s in exported_series(n, k)} | RAY_SYSTEM_METRICS


def metric_names(expr: str) -> set[str]:
    # A metric name is an identifier directly followed by `{`, `[`, `)` / whitespace / end, that is not a
    # function, keyword or label; all of ours and Ray's start with `ray_`.
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))
    names |= set(re.findall(r"\b(ray_[a-zA-Z0-9_:]*)\b", expr))
    return names - PROMQL_FUNCTIONS


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return [p for p in out if p["type"] != "row"]


def test_importable_shape(dashboard):
    # What Grafana's "Import dashboard" needs: no fixed numeric id (it would clash), a uid, a title, panels.
    assert dashboard.get("id") is None
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    ids = [p["id"] for p in rows + _panels(dashboard)]
    assert len(set(ids)) == len(ids), "duplicate panel ids"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} off the grid"


def test_prometheus_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    # Every $variable a query uses must be defined (Grafana would send the literal text otherwise).
    used = {m for p in _panels(dashboard) for t in p["targets"] for m in re.findall(r"\$(\w+)", t["expr"])}
    assert used <= set(variables) | {"__rate_interval", "__interval"}, used - set(variables)


def test_every_expr_references_a_known_metric(dashboard):
    seen = set()
    for panel in _panels(dashboard):
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids)
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            names = metric_names(expr)
            assert names, f"{panel['title']!r}: no metric in {expr!r}"
            unknown = names - KNOWN
            assert not unknown, f"{panel['title']!r}: unknown metric(s) {unknown} in {expr!r}"
            seen |= names
    missing = {n for n, k in APP_METRICS.items() if not exported_series(n, k) & seen}
    assert not missing, f"metrics with no panel: {missing}"


def test_counters_are_queried_as_counters(dashboard):
    # A counter's exported name ends in _total; plotting the gauge-style name would show an empty panel.
    exprs = [t["expr"] for p in _panels(dashboard) for t in p["targets"]]
    for name, kind in APP_METRICS.items():
        if kind == "counter" and not name.endswith("_total"):
            assert not any(re.search(rf"\bray_{name}\b(?!_total)", e) for e in exprs), name


def test_exported_name_rule():
    assert exported_name("otterhd_train_loss", "gauge") == "ray_otterhd_train_loss"
    assert exported_name("otterhd_eval_judge_requests", "counter") == "ray_otterhd_eval_judge_requests_total"
    assert exported_name("otterhd_train_tokens_total", "counter") == "ray_otterhd_train_tokens_total"


def test_metric_name_parser():
    assert metric_names('sum(rate(ray_otterhd_eval_judge_requests_total{SessionName=~"$S"}[1m]))') == {
        "ray_otterhd_eval_judge_requests_total"
    }
    assert metric_names("avg(ray_node_gpus_utilization) / 100") == {"ray_node_gpus_utilization"}
    assert metric_names('typo_metric{a="b"}') == {"typo_metric"}
