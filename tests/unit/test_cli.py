"""The `otterhd` command: argument wiring and user-facing errors (the heavy paths are tested elsewhere)."""


import pyarrow.parquet as pq
import pytest

from otterhd_ray.cli import build_parser, main
from tests.helpers import shared_fixture


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("data", "finetune", "export", "evaluate", "demo"):
        assert command in out


def test_confg_spelling_is_accepted():
    args = build_parser().parse_args(["evaluate", "--confg", "benchmark.yaml"])
    assert args.config == "benchmark.yaml"


def test_synth_then_convert_errors_cleanly(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--train", "4", "--bench", "2"]) == 0
    assert pq.read_metadata(next((tmp_path / "d" / "train").glob("*.parquet"))).num_rows == 4
    assert (tmp_path / "d" / "magnifierbench" / "data").is_dir()


def test_convert_refuses_overwrite_without_flag(tmp_path, capsys):
    mimicit = shared_fixture("mimicit")
    argv = ["data", "convert", "--instructions", str(mimicit / "SYN_instructions.json"),
            "--images", str(mimicit / "SYN.parquet"), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "otterhd: error:" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_unknown_config_key_is_one_clear_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochz: 3\n")
    assert main(["finetune", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.epochz" in err and str(cfg) in err


def test_finetune_exit_code_follows_the_training_outcome(tmp_path, monkeypatch, capsys):
    """`otterhd finetune` and `jobs/finetune.py` share one main: a failed fit exits 1 with the JSON summary."""
    import types

    import otterhd_ray.train.trainer as trainer

    outcome = {}

    def fake_run(cfg):
        return types.SimpleNamespace(error=outcome.get("error"), checkpoint=None, metrics={"loss": 1.5})

    monkeypatch.setattr(trainer, "run_finetune", fake_run)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train:\n  output_dir: {tmp_path / 'out'}\n")
    assert main(["finetune", "--config", str(cfg)]) == 0
    assert '"status": "succeeded"' in capsys.readouterr().out
    outcome["error"] = RuntimeError("worker died")
    assert main(["finetune", "--config", str(cfg)]) == 1
    captured = capsys.readouterr()
    assert '"status": "failed"' in captured.out and "worker died" in captured.err


def _run(model: str, correct: int, unparsed: int, n: int = 64) -> dict:
    return {"model": model, "mc_accuracy": correct / n,
            "counts": {"evaluated": n, "mc_correct": correct, "unparsed": unparsed}}


def test_demo_summary_says_what_the_numbers_mean():
    from otterhd_ray.demo import summary_line

    text = summary_line({"runs": [_run("untrained", 0, 64), _run("fine-tuned", 40, 4)]})
    assert "untrained 0.0 % -> fine-tuned 62.5 % (64 items, 4 options; unparsed replies: 64 -> 4)" in text
    # the expected score with a random guess per unparsed reply: 64/4 of 64 and (40 + 1) of 64
    assert "untrained 25 %, fine-tuned 64 %" in text
    assert summary_line({"runs": [_run("fine-tuned", 1, 0)]}) == ""


def test_demo_progress_prints_training_and_in_training_eval_lines(tmp_path, capsys):
    import json

    from otterhd_ray.demo import Progress

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # an earlier run's record: not shown
    progress = Progress(tmp_path, lines=2)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        for step in (2, 4):
            f.write(json.dumps({"step": step, "total_steps": 4, "loss": 1.0 / step, "lr": 1e-3,
                                "tokens_per_s": 1000.0}) + "\n")
    (tmp_path / "eval_metrics.jsonl").write_text(json.dumps({
        "step": 4, "epoch": 0, "eval/benchmark": "magnifierbench", "eval/trigger": "epoch_end",
        "eval/num_items": 64, "eval/seconds": 1.5, "eval/magnifierbench/mc_accuracy": 0.375}) + "\n"
        + '{"step": 5, "eval/benchmark"')  # a line still being written: waits for the next poll
    progress.poll()
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == ["2/4", "4/4", "4"]
    assert out[-1].strip() == "step    4  end of epoch 1: held-out MC accuracy 37.5 % on 64 items (2 s)"
    assert progress.losses == [0.5, 0.25] and progress.last["step"] == 4 and len(progress.eval_history) == 1


def test_demo_loss_trend_averages_the_first_and_last_tenth():
    from otterhd_ray.demo import loss_trend

    losses = [5.0] * 10 + [3.0] * 80 + [1.0] * 9 + [2.0]
    assert loss_trend(losses) == "mean loss 5.000 (first tenth of the logged steps) -> 1.100 (last tenth)"
    assert loss_trend([]) == "no loss logged"


def test_demo_rerun_clears_the_earlier_run_but_not_the_data(tmp_path, capsys):
    from otterhd_ray.demo import clear_earlier

    run, data = tmp_path / "finetune", tmp_path / "data"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    data.mkdir()
    clear_earlier(run, tmp_path / "never-made")
    assert not run.exists() and data.is_dir()
    assert capsys.readouterr().out.strip() == f"removed the earlier demo run's {run}"
    clear_earlier(run)
    assert capsys.readouterr().out == ""


def test_demo_stderr_filter_drops_only_the_known_benign_ray_line(capfd):
    import os

    from otterhd_ray.demo import drop_known_benign_stderr

    benign = (b"[2026-12-01 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker' has constructor "
              b"arguments in the object store and max_restarts > 0. If the arguments ... restart will fail.\n")
    with drop_known_benign_stderr():
        os.write(2, b"ERROR something the user must see\n")
        os.write(2, benign)
        os.write(2, b"last line without newline")
    os.write(2, b"\nafter: " + benign)  # outside the block nothing is filtered
    err = capfd.readouterr().err
    assert err.splitlines() == ["ERROR something the user must see", "last line without newline",
                                "after: " + benign.decode().rstrip("\n")]
