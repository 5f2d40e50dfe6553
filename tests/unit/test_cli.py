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
