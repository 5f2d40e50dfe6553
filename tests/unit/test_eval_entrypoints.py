"""`python -m otterhd_ray.evaluate` / jobs/evaluate.py: both spellings of --config, errors name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from otterhd_ray.evaluate import build_parser, main
from tests.helpers import SHARED_FIXTURES

REPO = Path(__file__).resolve().parents[2]


def test_both_spellings_and_overrides():
    for flag in ("--config", "--confg", "-c"):
        args = build_parser().parse_args([flag, "b.yaml", "num_actors=2"])
        assert args.config == "b.yaml" and args.overrides == ["num_actors=2"]


def test_config_errors_exit_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "b.yaml"
    bad.write_text(
        "datasets: [{name: magnifierbench}]\nmodels: [{name: fuyu, model_path: m}]\nnum_actorz: 2\n"
    )
    assert main(["--confg", str(bad)]) == 2
    assert "unknown key 'num_actorz'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_job_script_runs_without_install(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("datasets: []\nmodels: []\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "datasets" in proc.stderr


def test_seed_config_without_the_model_is_a_clear_error(tmp_path, capsys):
    # The seed's YAML as written: its model dir does not exist here -> exit 2 with a message, before any Ray.
    bench = tmp_path / "bench"
    bench.mkdir()
    cfg = (REPO / "configs/benchmark/magnifierbench_seed.yaml").read_text()
    cfg = cfg.replace("Otter-AI/MagnifierBench", str(SHARED_FIXTURES / "magnifierbench"))
    (tmp_path / "b.yaml").write_text(cfg + f"output_dir: {tmp_path / 'out'}\n")
    assert main(["--confg", str(tmp_path / "b.yaml")]) == 2
    assert "azure_storage/fuyu-8b" in capsys.readouterr().err
