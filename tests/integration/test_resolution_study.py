"""The resolution study continues itself across process calls (benchmarks/resolution_study.py).

The GPU box allows 600 s per command, so the study runs as a sequence of calls of the same command: each one
trains or evaluates until its budget, saves its state atomically and stops; the next one resumes. Here a CPU
smoke run is split by the step / side stop hooks (deterministic, unlike wall time) and must end exactly where a
single run ends: every step once, each eval side once, the same report files.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "resolution_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("resolution_study_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _argv(out: Path, *extra: str) -> list[str]:
    return ["--smoke", "--workers", "0", "--steps", "8", "--log-every", "2", "--out", str(out), *extra]


@pytest.mark.timeout(240)
def test_split_run_resumes_without_repeating_steps_or_sides(study, tmp_path, monkeypatch):
    evaluated: list[int] = []
    real_evaluate = study.evaluate_side

    def counting_evaluate(model, tokenizer, items, side, device):
        evaluated.append(-side if items[0].get("blank") else side)  # negative: the no-image control
        return real_evaluate(model, tokenizer, items, side, device)

    monkeypatch.setattr(study, "evaluate_side", counting_evaluate)
    out = tmp_path / "out"
    first = study.main(_argv(out, "--stop-after-steps", "3"))
    assert first == {"finished": False, "state": str(out / "state"), "step": 3, "eval_sides_done": []}
    assert not (out / "resolution_study.json").exists()
    assert study.main(_argv(out, "--stop-after-steps", "4"))["step"] == 7
    third = study.main(_argv(out, "--stop-after-sides", "1"))  # trains step 8, evaluates one side
    assert third["step"] == 8 and third["eval_sides_done"] == ["120"] and evaluated == [120]
    summary = study.main(_argv(out))
    assert evaluated == [120, 180, -120]  # the finished side was not redone; then the no-image control

    assert summary["finished"] and summary["steps_done"] == 8 and not summary["stopped_early"]
    steps = [h["step"] for h in summary["history"]]
    assert steps == [2, 4, 6, 8]  # continuous, no duplicates, the window across the stop at step 3 kept
    tokens = [h["tokens"] for h in summary["history"]]
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    calls = summary["calls"]
    assert [c["steps"] for c in calls] == [[1, 3], [4, 7], [8, 8], None]
    assert [c["eval_sides"] for c in calls] == [[], [], [120], [180]]
    assert [c["stopped"] for c in calls] == ["stop hook"] * 3 + [None]
    assert all(c["wall_s"] > 0 for c in calls)
    assert summary["train_s"] == pytest.approx(sum(c["train_s"] for c in calls))
    assert set(summary["accuracy"]) == {"120", "180"}
    assert set(summary["accuracy"]["120"]) == {"colour", "shape", "count", "position", "all", "unparsed"}
    assert summary["no_image_control"]["long_side"] == 120
    assert set(summary["no_image_control"]["accuracy"]) == set(summary["accuracy"]["120"])
    table = (out / "resolution_study.md").read_text()
    assert "| no image (grey, 120) |" in table
    assert table.startswith("| long side | colour | shape | count | position | all | unparsed |")
    assert "| 120 |" in table and "| 180 |" in table
    assert (out / "resolution_study.json").exists()
    pytest.importorskip("matplotlib")
    assert (out / "resolution_study.png").stat().st_size > 0

    again = study.main(_argv(out))  # a finished study only rewrites its report
    assert again["finished"] and len(again["calls"]) == 4 and evaluated == [120, 180, -120]


def test_resumed_training_draws_fresh_scenes(study, tmp_path):
    from otterhd_ray.data.tokenizer import build_tiny_tokenizer

    keys = {study.train_scene_key(0, segment, 0, i) for segment in range(3) for i in range(3)}
    assert len(keys) == 9 and not any(k.startswith("study-eval") for k in keys)
    build_tiny_tokenizer(tmp_path / "tok")
    args = study.parse_args(["--smoke", "--workers", "0", "--out", str(tmp_path)])
    firsts = [next(iter(study.SceneStream(str(tmp_path / "tok"), args, segment))) for segment in (0, 0, 1)]
    assert firsts[0]["patches"].tobytes() == firsts[1]["patches"].tobytes()  # a stream is reproducible
    assert firsts[0]["patches"].tobytes() != firsts[2]["patches"].tobytes()  # the next segment is not a replay


@pytest.mark.timeout(240)
def test_bad_state_is_a_one_line_error_naming_the_file(study, tmp_path):
    out = tmp_path / "out"
    stopped = study.main(_argv(out, "--call-minutes", "0.0001"))  # the wall-time stop: after the first step
    assert stopped["step"] == 1
    progress = study.json.loads((out / "state" / "progress.json").read_text())
    assert progress["calls"][0]["stopped"] == "--call-minutes 0.0001"

    with pytest.raises(ValueError, match="steps=8, this command 9"):
        study.main(_argv(out, "--steps", "9"))  # another study in the same state: refused, not mixed
    train_pt = out / "state" / "train.pt"
    good = train_pt.read_bytes()
    train_pt.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"train\.pt: unreadable study state"):
        study.main(_argv(out))
    proc = subprocess.run([sys.executable, str(BENCH), *_argv(out)], capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and str(train_pt) in proc.stderr  # one line, no traceback

    train_pt.unlink()
    with pytest.raises(ValueError, match=r"train\.pt: study state file is missing"):
        study.main(_argv(out))
    train_pt.write_bytes(good)
    (out / "state" / "progress.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"progress\.json: unreadable study state"):
        study.main(_argv(out))


@pytest.mark.timeout(120)
def test_smoke_trains_under_bf16_autocast_as_on_the_gpu(study, tmp_path):
    # The GPU run trains float32 weights under bf16 autocast; this path raised a dtype error at its first step
    # (patch scatter, chunked loss) until the model and loss were made autocast-safe.
    summary = study.main(_argv(tmp_path / "out", "--autocast", "on"))
    assert summary["finished"] and summary["steps_done"] == 8
    assert all(h["loss"] == h["loss"] and h["loss"] > 0 for h in summary["history"])  # finite, not NaN


@pytest.mark.timeout(120)
def test_auto_steps_calibrate_then_fix_the_schedule_across_calls(study, tmp_path, capsys):
    # --steps auto: warm-up over the calibration steps, then the measured pace fixes the cosine's length (here the
    # --max-steps cap binds, which keeps the test deterministic); a call that stops before the calibration resumes
    # into it.
    out = tmp_path / "out"
    argv = ["--smoke", "--workers", "0", "--steps", "auto", "--calibrate-steps", "3", "--max-steps", "9",
            "--train-minutes", "30", "--log-every", "1", "--out", str(out)]
    first = study.main([*argv, "--stop-after-steps", "2"])
    assert first["step"] == 2 and not first["finished"]
    assert "calibration" not in capsys.readouterr().out
    summary = study.main(argv)
    assert "the schedule ends at step 3 + 6 = 9" in capsys.readouterr().out
    assert summary["finished"] and summary["steps_mode"] == "auto" and summary["steps"] == summary["steps_done"] == 9
    lrs = [h["lr"] for h in summary["history"]]
    assert lrs[0] < lrs[2] and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # warm-up, then cosine down to 0
    assert [h["step"] for h in summary["history"]] == list(range(1, 10))


def test_steps_must_be_a_number_or_auto(study, tmp_path):
    with pytest.raises(ValueError, match="--steps must be a number or auto"):
        study.parse_args(["--steps", "many", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--calibrate-steps"):
        study.parse_args(["--steps", "auto", "--calibrate-steps", "50", "--max-steps", "50", "--out", str(tmp_path)])
