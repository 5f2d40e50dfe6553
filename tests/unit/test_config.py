import pytest

from otterhd_ray.config import (
    ConfigError,
    FinetuneConfig,
    load_finetune_config,
    parse_overrides,
)


def test_defaults_validate():
    cfg = FinetuneConfig()
    assert cfg.data.max_tokens == 16384
    assert cfg.deepspeed.stage == 2


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  max_tokens: 4096\nmodel:\n  path: /models/fuyu\n")
    cfg = load_finetune_config(f, ["data.max_tokens=8192", "ray.use_gpu=true", "optim.betas=[0.9, 0.95]"])
    assert cfg.data.max_tokens == 8192
    assert cfg.ray.use_gpu is True
    assert cfg.optim.betas == (0.9, 0.95)
    # tokenizer defaults to the model directory
    assert cfg.data.tokenizer_path == "/models/fuyu"


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  max_tokenz: 4096\n")
    with pytest.raises(ConfigError) as err:
        load_finetune_config(f)
    assert "data.max_tokenz" in str(err.value)
    assert str(f) in str(err.value)


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match="train.epochz"):
        load_finetune_config(None, ["train.epochz=3"])


def test_bad_type_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="max_tokens"):
        load_finetune_config(None, ["data.max_tokens=lots"])


@pytest.mark.parametrize("bad", ["novalue", "=3", "a.b"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        parse_overrides([bad])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_finetune_config("/nonexistent/x.yaml")


def test_top_level_must_be_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_finetune_config(f)


def test_misspelt_fault_key_is_rejected_naming_key_and_file(tmp_path):
    # Fault injection is a typed section: a test whose fault key is misspelt fails instead of passing unarmed.
    f = tmp_path / "faults.yaml"
    f.write_text("faults:\n  fail_at_stepp: 3\n")
    with pytest.raises(ConfigError) as err:
        load_finetune_config(f)
    assert "faults.fail_at_stepp" in str(err.value) and str(f) in str(err.value)
    cfg = load_finetune_config(None, ["faults.stop_after_step=4"])
    assert cfg.faults.stop_after_step == 4 and cfg.faults.fail_at_step is None
    with pytest.raises(ConfigError, match="fail_marker"):
        load_finetune_config(None, ["faults.fail_at_step=3"])  # the kill-once marker is required


def test_loop_rejects_untyped_extras():
    from otterhd_ray.train.loop import train_loop_per_worker

    with pytest.raises(ValueError, match="fail_at_step"):
        train_loop_per_worker({"config": FinetuneConfig().model_dump(mode="json"), "fail_at_step": 3})
