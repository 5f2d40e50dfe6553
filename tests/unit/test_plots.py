"""otterhd_ray.plots: figures from a run's files (metrics.jsonl, evaluation metrics.json)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from otterhd_ray import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_history(path, records, torn: bool = False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + ('{"loss": 1.0, "st' if torn else ""))


def _record(step, attempt=0, loss=None):
    return {"step": step, "attempt": attempt, "loss": loss if loss is not None else 5.0 / step, "lr": 1e-3,
            "tokens_per_s": 1000.0 + step, "data_wait_fraction": 0.1}


def test_loss_png_beside_the_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_history(path, [_record(s) for s in range(1, 11)], torn=True)  # a killed writer's torn last line
    out = plots.plot_training(path)
    assert out == tmp_path / "loss.png"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000


def test_attempts_are_separate_series(tmp_path):
    path = tmp_path / "metrics.jsonl"
    # attempt 0 ran to step 6 and died; attempt 1 resumed from the step-4 checkpoint and replayed 5-6
    _write_history(path, [_record(s, 0) for s in range(1, 7)] + [_record(s, 1, 9.0) for s in range(5, 11)])
    history = plots.read_history(path)
    assert sorted({r["attempt"] for r in history}) == [0, 1]
    assert plots.plot_training(path, tmp_path / "x.png").read_bytes()[:8] == PNG_MAGIC


def test_no_records_is_a_clear_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="no metrics records"):
        plots.plot_training(path)
    with pytest.raises(ValueError, match="nothing to plot"):
        plots.plot_run(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        plots.plot_run(tmp_path / "missing")


def _kinds(**acc):
    return {"question_kinds": {k: {"correct": round(4 * a), "total": 4, "accuracy": a} for k, a in acc.items()}}


def test_per_kind_chart_only_when_kinds_exist(tmp_path):
    run = {"model": "otterhd", "dataset": "magnifierbench/test", "breakdown": _kinds(colour=0.75, count=0.25)}
    assert plots.plot_per_kind({"runs": [{**run, "breakdown": {}}]}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    before = {**run, "model": "untrained", "breakdown": _kinds(colour=0.0)}
    out = plots.plot_per_kind({"runs": [before, run]}, tmp_path / "kinds.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_run_finds_every_input(tmp_path):
    (tmp_path / "finetune").mkdir()
    _write_history(tmp_path / "finetune" / "metrics.jsonl", [_record(s) for s in range(1, 5)])
    (tmp_path / "eval").mkdir()
    run = {"model": "m", "dataset": "d", "breakdown": _kinds(shape=0.5)}
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"runs": [run]}))
    written = plots.plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["loss.png", "per_kind.png"]


def test_question_kinds_of_the_synthetic_benchmark(tmp_path):
    from otterhd_ray.data import synth
    from otterhd_ray.eval.benchmarks import get_benchmark
    from otterhd_ray.eval.benchmarks.magnifierbench import question_kind
    from otterhd_ray.eval.config import BenchDatasetSpec

    synth.synthesize(tmp_path, num_train=0, num_bench=8, seed=0, level="easy")
    spec = BenchDatasetSpec(name="magnifierbench", data_path=str(tmp_path / "magnifierbench"))
    items = get_benchmark("magnifierbench")(spec).load().items
    assert [it.doc["kind"] for it in items] == [synth.KINDS[i % 4] for i in range(8)]  # item i asks KINDS[i % 4]
    assert question_kind("Is the man wearing a hat?") == "other"


def test_magnifierbench_breakdown_by_kind_and_report_chart(tmp_path):
    from otterhd_ray.eval.benchmarks.magnifierbench import kinds_breakdown
    from otterhd_ray.eval.report import _per_kind_chart

    table = kinds_breakdown(["colour", "colour", "count", "other"], [True, False, True, False])
    assert table["colour"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert sorted(table) == ["colour", "count", "other"]
    assert kinds_breakdown(["other", "other"], [True, False]) == {}  # no known kind: no table, no chart
    metrics = {"runs": [{"model": "m", "dataset": "d", "breakdown": {"question_kinds": table}}]}
    assert _per_kind_chart(metrics, tmp_path).read_bytes()[:8] == PNG_MAGIC
    assert _per_kind_chart({"runs": [{"model": "m", "dataset": "d", "breakdown": {}}]}, tmp_path / "x") is None
