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


def test_per_kind_chart_only_when_kinds_exist(tmp_path):
    run = {"model": "otterhd", "dataset": "magnifierbench/test", "mc_accuracy": 0.5,
           "per_kind": {"colour": {"items": 4, "mc_accuracy": 0.75}, "count": {"items": 4, "mc_accuracy": 0.25}}}
    assert plots.plot_per_kind({"runs": [{**run, "per_kind": {}}]}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    before = {**run, "model": "untrained", "per_kind": {"colour": {"items": 4, "mc_accuracy": 0.0}}}
    out = plots.plot_per_kind({"runs": [before, run]}, tmp_path / "kinds.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_run_finds_every_input(tmp_path):
    (tmp_path / "finetune").mkdir()
    _write_history(tmp_path / "finetune" / "metrics.jsonl", [_record(s) for s in range(1, 5)])
    (tmp_path / "eval").mkdir()
    run = {"model": "m", "dataset": "d", "per_kind": {"shape": {"items": 2, "mc_accuracy": 0.5}}}
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"runs": [run]}))
    written = plots.plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["loss.png", "per_kind.png"]


def test_question_kinds_of_the_synthetic_benchmark():
    from otterhd_ray.data import synth
    from otterhd_ray.eval.magnifierbench import question_kind, split_instruction

    for index in range(8):  # bench item i asks kind KINDS[i % 4]
        question, _ = split_instruction(synth.bench_row(0, index, "easy")["instruction"])
        assert question_kind(question) == synth.KINDS[index % 4]
    assert question_kind("Is the man wearing a hat?") == "other"


def test_report_has_per_kind_line_and_chart(tmp_path):
    from otterhd_ray.eval.report import write_report

    run = {"model": "otterhd", "dataset": "magnifierbench/test", "model_path": "m", "resolution": -1,
           "mc_parse": "strict", "mc_accuracy": 0.5, "ff_accuracy": None, "results_path": "r.jsonl",
           "counts": {"rows": 8, "evaluated": 8, "failed": 0, "skipped": 0, "skipped_by_reason": {},
                      "mc_correct": 4, "parsed": 8, "unparsed": 0, "ff_correct": 0, "judged": 0, "unjudged": 8},
           "judge": {"kind": "rule", "model": "none"}, "prediction_error": None,
           "timing": {"wall_s": 1.0, "predict_s": 1.0, "predicted_this_run": 8, "resumed": 0,
                      "items_per_s": 8.0, "items_per_generate_s": None},
           "per_kind": {"colour": {"items": 4, "mc_accuracy": 1.0}, "count": {"items": 4, "mc_accuracy": 0.0}}}
    text = write_report(tmp_path, {"runs": [run]})
    assert "per question kind: colour 100.0% of 4, count 0.0% of 4" in text
    assert "![multiple-choice accuracy per question kind](per_kind.png)" in text
    assert (tmp_path / "per_kind.png").read_bytes()[:8] == PNG_MAGIC
