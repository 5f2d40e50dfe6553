"""Benchmark config: the seed's YAML parses unchanged, unknown keys are named, the key never leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from otterhd_ray.config import ConfigError
from otterhd_ray.eval.config import BenchmarkConfig, load_benchmark_config, resolve_api_key

REPO = Path(__file__).resolve().parents[2]

# The seed README's benchmark.yaml, as a user would type it (its `api_key: [You GPT-4 API]` is a YAML list).
SEED_YAML = """\
datasets:
  - name: magnifierbench
    split: test
    data_path: Otter-AI/MagnifierBench
    prompt: Answer with the option letter from the given choices directly.
    api_key: [You GPT-4 API]
models:
  - name: fuyu
    model_path: azure_storage/fuyu-8b
    resolution: 1440
"""


def test_seed_yaml_parses(tmp_path):
    path = tmp_path / "benchmark.yaml"
    path.write_text(SEED_YAML)
    cfg = load_benchmark_config(path)
    (ds,) = cfg.datasets
    (model,) = cfg.models
    assert ds.name == "magnifierbench" and ds.split == "test" and ds.data_path == "Otter-AI/MagnifierBench"
    assert ds.prompt.startswith("Answer with the option letter")
    assert ds.api_key is None  # the placeholder list is "no key"
    assert (model.name, model.model_path, model.resolution) == ("fuyu", "azure_storage/fuyu-8b", 1440)
    assert cfg.judge.model == "gpt-4-0613" and cfg.judge.temperature == 0.0


def test_committed_configs_parse():
    seed = load_benchmark_config(REPO / "configs/benchmark/magnifierbench_seed.yaml")
    assert seed.models[0].resolution == 1440 and seed.datasets[0].api_key is None
    demo = load_benchmark_config(REPO / "configs/benchmark/demo.yaml")
    assert demo.num_actors >= 1 and demo.models[0].name in ("fuyu", "otterhd")


@pytest.mark.parametrize(
    "extra, named",
    [
        ("num_actor: 2\n", "num_actor"),
        ("judge:\n  concurency: 3\n", "judge.concurency"),
    ],
)
def test_unknown_keys_are_named(tmp_path, extra, named):
    path = tmp_path / "b.yaml"
    path.write_text(SEED_YAML + extra)
    with pytest.raises(ConfigError) as err:
        load_benchmark_config(path)
    assert f"unknown key '{named}'" in str(err.value) and str(path) in str(err.value)


def test_unknown_key_inside_a_list_entry_is_named(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(SEED_YAML.replace("    resolution: 1440", "    resolution: 1440\n    resolutoin: 2"))
    with pytest.raises(ConfigError, match=r"unknown key 'models\.0\.resolutoin'"):
        load_benchmark_config(path)


def test_bad_model_name_and_resolution_are_errors():
    base = {"datasets": [{"name": "magnifierbench"}], "models": [{"name": "llava", "model_path": "x"}]}
    with pytest.raises(ValueError):
        BenchmarkConfig.model_validate(base)
    base["models"] = [{"name": "fuyu", "model_path": "x", "resolution": 0}]
    with pytest.raises(ValueError):
        BenchmarkConfig.model_validate(base)


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(SEED_YAML)
    cfg = load_benchmark_config(path, ["num_actors=3", "judge.concurrency=16", "mc_parse=legacy"])
    assert (cfg.num_actors, cfg.judge.concurrency, cfg.mc_parse) == (3, 16, "legacy")
    with pytest.raises(ConfigError):
        load_benchmark_config(path, ["mc_parse=fuzzy"])


def test_key_sources_and_secrecy(monkeypatch):
    secret = "sk-test-ABCDEF0123456789"
    raw = {
        "datasets": [{"name": "magnifierbench", "api_key": secret}],
        "models": [{"name": "fuyu", "model_path": "m"}],
    }
    cfg = BenchmarkConfig.model_validate(raw)
    assert (
        secret not in repr(cfg)
        and secret not in cfg.model_dump_json()
        and secret not in str(cfg.model_dump())
    )
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-key-999")
    assert resolve_api_key(cfg.datasets[0], cfg.judge) == secret  # the config's key wins where it is given
    raw["datasets"][0]["api_key"] = ["You GPT-4 API"]
    cfg = BenchmarkConfig.model_validate(raw)
    assert resolve_api_key(cfg.datasets[0], cfg.judge) == "sk-env-key-999"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert resolve_api_key(cfg.datasets[0], cfg.judge) is None


def test_all_benchmarks_config_lists_the_eight_and_seed_kwargs_parse(tmp_path):
    cfg = load_benchmark_config(REPO / "configs/benchmark/all_benchmarks.yaml")
    names = [d.name for d in cfg.datasets]
    assert names == ["magnifierbench", "mme", "pope", "mmbench", "seedbench", "scienceqa", "mathvista", "mmvet"]
    # The seed's per-dataset kwargs (Otter's MathVistaDataset etc.) parse; datasets without data_path get the hub id.
    path = tmp_path / "b.yaml"
    path.write_text(
        SEED_YAML.replace(
            "models:",
            "  - name: mathvista\n    split: testmini\n    api_key: [You GPT-4 API]\n    gpt_model: gpt-4-0613\n"
            "    default_output_path: ./logs/MathVista\n    quick_extract: true\n  - name: pope\nmodels:",
        )
    )
    ds = load_benchmark_config(path).datasets
    assert (ds[1].data_path, ds[1].gpt_model, ds[1].quick_extract) == ("AI4Math/MathVista", "gpt-4-0613", True)
    assert (ds[2].data_path, ds[2].split) == ("lmms-lab/POPE", "test")
    path.write_text(SEED_YAML.replace("name: magnifierbench", "name: mmmu"))
    with pytest.raises(ConfigError, match="unknown benchmark 'mmmu'"):
        load_benchmark_config(path)
