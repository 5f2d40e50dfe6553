"""benchmarks/lora_throughput.py --smoke: every part (peft, ours, the job) runs on CPU and writes its tables."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_smoke_run_writes_every_part(tmp_path):
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import lora_throughput

    assert lora_throughput.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "lora_throughput.json").read_text())
    names = set(data["results"])
    assert {"peft_gcoff_b1", "peft_gcon_b1", "ours_none", "ours_selective"} <= names
    for name in names:
        assert data["results"][name]["real_tokens_per_s"] > 0, name
        assert data["results"][name]["trainable_params"] > 0, name
    # the same adapters on both sides: equal trainable parameter counts
    assert data["results"]["ours_none"]["trainable_params"] == data["results"]["peft_gcoff_b1"]["trainable_params"]
    assert [j["run"] for j in data["jobs"]] == ["model", "ds2"] and all(j["status"] == "ok" for j in data["jobs"])
    assert "| ours_none |" in (tmp_path / "lora_throughput.md").read_text()
