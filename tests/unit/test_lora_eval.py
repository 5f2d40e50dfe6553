"""Evaluation with an adapter: `models: [{model_path: BASE, adapter_path: DIR}]` loads base + PEFT adapter, merged."""

from __future__ import annotations

import shutil

import pytest
import torch

from otterhd_ray.eval.config import BenchmarkConfig
from otterhd_ray.eval.predictor import Predictor
from otterhd_ray.models.fuyu import save_hf
from otterhd_ray.models.fuyu.lora import LoraSpec, adapters, add_lora, merge
from otterhd_ray.models.fuyu.peft import save_peft_adapter


def test_benchmark_yaml_takes_adapter_path():
    cfg = BenchmarkConfig.model_validate({
        "datasets": [{"name": "magnifierbench", "data_path": "x"}],
        "models": [{"name": "otterhd", "model_path": "/base", "adapter_path": "/adapter"}, {"name": "fuyu",
                                                                                          "model_path": "/base"}],
    })
    assert [m.adapter_path for m in cfg.models] == ["/adapter", None]


def test_adapter_gets_its_own_run_dir_and_fingerprint():
    from otterhd_ray.eval.pipeline import run_fingerprint

    cfg = BenchmarkConfig.model_validate({
        "datasets": [{"name": "magnifierbench", "data_path": "x"}],
        "models": [{"name": "otterhd", "model_path": "/m/base"},
                   {"name": "otterhd", "model_path": "/m/base", "adapter_path": "/runs/lora/adapter/"}],
    })
    base, tuned = cfg.models
    assert (base.display_name, tuned.display_name) == ("otterhd:base", "otterhd:base+adapter")
    ds = cfg.datasets[0]
    assert run_fingerprint(base, ds, 16) != run_fingerprint(tuned, ds, 16)


def test_predictor_loads_base_plus_adapter_merged(tiny_tokenizer_dir, tmp_path):
    from otterhd_ray.data.tokenizer import load_tokenizer
    from otterhd_ray.models.fuyu.config import config_for_tokenizer, flavour_config
    from otterhd_ray.models.fuyu.model import new_model

    cfg = config_for_tokenizer(flavour_config("debug"), load_tokenizer(tiny_tokenizer_dir))
    torch.manual_seed(0)
    model = new_model(cfg)
    save_hf(model, tmp_path / "base")
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy2(f, tmp_path / "base" / f.name)
    add_lora(model, LoraSpec(r=2, alpha=4, targets=("dense_h_to_4h", "lm_head")))
    with torch.no_grad():
        for _, a in adapters(model):
            a.B.normal_(0, 0.1)
    save_peft_adapter(model, tmp_path / "adapter")
    merge(model)
    pred = Predictor(str(tmp_path / "base"), device="cpu", adapter_path=str(tmp_path / "adapter"))
    loaded = pred.model.state_dict()
    for k, v in model.state_dict().items():
        if ".lora." not in k:
            torch.testing.assert_close(loaded[k], v, rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(loaded["lm_head.weight"], new_model(cfg).lm_head.weight)
    with pytest.raises(ValueError, match="adapter_config.json"):
        Predictor(str(tmp_path / "base"), device="cpu", adapter_path=str(tmp_path))
