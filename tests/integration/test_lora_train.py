"""LoRA through the real training loop: DeepSpeed ZeRO-2/3 and the torch engine in-process, resume, small
checkpoints (adapters + optimizer), export as a PEFT adapter (peft loads it) and merged (transformers loads it),
continued training from an adapter peft made, and (slow) a killed Ray Train worker with LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".venv" / "torch_extensions"))

from otterhd_ray.config import FinetuneConfig, load_finetune_config  # noqa: E402
from otterhd_ray.train.loop import InjectedStop, LocalContext, train_loop_per_worker  # noqa: E402
from tests.helpers import data_overrides, reset_distributed, synth_train_dir  # noqa: E402

pytestmark = pytest.mark.timeout(600)
LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
        "lora.targets=[query_key_value, dense, dense_h_to_4h, dense_4h_to_h, lm_head]"]


@pytest.fixture(scope="module", autouse=True)
def _release_process_group():
    reset_distributed()  # an earlier module may have left its group behind
    yield
    reset_distributed()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synth_train_dir(tmp_path_factory.mktemp("lora_data"), num_train=16, num_bench=0, seed=3, rows_per_file=8)


def _cfg(data_dir: Path, out: Path, *overrides: str) -> FinetuneConfig:
    return load_finetune_config(None, [
        *data_overrides(data_dir),
        "data.max_tokens=512", "data.buckets.long_sides=[240]", "data.buckets.native=false",
        "optim.lr=1e-2", "optim.warmup_ratio=0.1", "train.epochs=2", "train.log_every_steps=1",
        "train.precision=fp32", f"train.output_dir={out}", "model.attention=eager",
        "deepspeed.stage=2", "deepspeed.torch_adam=true", *LORA, *overrides,
    ])


def _run(cfg: FinetuneConfig, root: Path, resume_from=None, stop_after_step: int | None = None) -> LocalContext:
    ctx = LocalContext(root, resume_from=resume_from)
    cfg = cfg.model_copy(deep=True)
    cfg.faults.stop_after_step = stop_after_step
    train_loop_per_worker({"config": cfg.model_dump(mode="json")}, ctx)
    return ctx


def _history(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def zero2_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_zero2")
    cfg = _cfg(data_dir, out, "train.checkpoint_every_steps=3")
    return cfg, _run(cfg, out / "ckpt"), out


def test_loss_falls_and_checkpoint_holds_adapters_only(zero2_run):
    from otterhd_ray.train.checkpoint import consolidated_state_dict

    _, ctx, out = zero2_run
    losses = [h["loss"] for h in _history(out)]
    assert losses[-1] < losses[0], losses
    ckpt = ctx.checkpoints[-1]
    state = consolidated_state_dict(ckpt)
    assert state and all(".lora." in k for k in state), sorted(state)[:4]
    assert (ckpt / "base" / "model.safetensors").is_file()  # random-init base: its only copy
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith(".B"))  # B moved away from 0


def test_resume_with_lora_reproduces_losses(data_dir, tmp_path, zero2_run):
    _, _, full_out = zero2_run
    losses = {r["step"]: r["loss"] for r in _history(full_out)}
    cfg = _cfg(data_dir, tmp_path, "train.checkpoint_every_steps=3")
    with pytest.raises(InjectedStop):
        _run(cfg, tmp_path / "ckpt", stop_after_step=4)
    ckpt = sorted((tmp_path / "ckpt").glob("checkpoint_*"))[-1]
    _run(cfg, tmp_path / "ckpt2", resume_from=ckpt)
    resumed = [r for r in _history(tmp_path) if r["resumed_from_step"] == 3]
    assert [r["step"] for r in resumed] == list(range(4, max(losses) + 1))
    for r in resumed:
        assert r["loss"] == pytest.approx(losses[r["step"]], rel=1e-5, abs=1e-6), r["step"]


def _logits_hf(model, ids, patches):
    from otterhd_ray.models.fuyu.inputs import normalize_patches

    with torch.no_grad():
        return model(input_ids=ids[None], image_patches=normalize_patches(patches)[None]).logits[0]


def _tokens(base_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from otterhd_ray.models.fuyu.hf import read_config

    cfg = read_config(base_dir)
    rng = np.random.default_rng(0)
    ids = [cfg.image_token_id] * 3 + [cfg.image_token_id + 1] + [cfg.bos_token_id] + rng.integers(20, 300, 6).tolist()
    return torch.tensor(ids), torch.from_numpy(rng.integers(0, 256, (3, cfg.patch_dim), dtype=np.uint8))


def test_export_adapter_for_peft_and_merged_for_transformers(zero2_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from otterhd_ray.export import export_checkpoint

    _, ctx, _ = zero2_run
    ckpt = ctx.checkpoints[-1]
    adapter = export_checkpoint(ckpt, tmp_path / "adapter", adapter_only=True)
    merged = export_checkpoint(ckpt, tmp_path / "merged", merge=True)
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    theirs = peft.PeftModel.from_pretrained(
        transformers.FuyuForCausalLM.from_pretrained(base, attn_implementation="eager"), adapter).eval()
    hf_merged = transformers.FuyuForCausalLM.from_pretrained(merged, attn_implementation="eager").eval()
    ids, patches = _tokens(merged)
    ref = _logits_hf(theirs, ids, patches)
    torch.testing.assert_close(_logits_hf(hf_merged, ids, patches), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="--merge and --adapter-only"):
        export_checkpoint(ckpt, tmp_path / "x", merge=True, adapter_only=True)


@pytest.mark.parametrize("engine", ["deepspeed.stage=3", "deepspeed.enabled=false"])
def test_zero3_and_torch_engines_train_lora_and_export(data_dir, tmp_path, engine):
    from otterhd_ray.export import export_checkpoint
    from otterhd_ray.models.fuyu.peft import read_spec

    cfg = _cfg(data_dir, tmp_path, engine, "train.max_steps=3", "train.checkpoint_every_steps=2")
    ctx = _run(cfg, tmp_path / "ckpt")
    history = _history(tmp_path)
    assert [h["step"] for h in history] == [1, 2, 3] and all(h["grad_norm"] > 0 for h in history)
    with pytest.raises(InjectedStop):  # resume from step 2 and stop again: the checkpoint loads into the engine
        _run(cfg, tmp_path / "ckpt2", resume_from=ctx.checkpoints[0], stop_after_step=3)
    out = export_checkpoint(ctx.checkpoints[-1], tmp_path / "adapter", adapter_only=True)
    assert read_spec(out).r == 4


def test_continued_training_from_an_adapter_peft_made(data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from otterhd_ray.models.fuyu.hf import save_hf
    from otterhd_ray.models.fuyu.lora import adapters
    from otterhd_ray.train.loop import build_model_for

    # A base with the tiny tokenizer's ids, saved as HF; peft makes an adapter on it with Otter's recipe.
    base_cfg = _cfg(data_dir, tmp_path, "lora.enabled=false")
    save_hf(build_model_for(base_cfg, torch.device("cpu")), tmp_path / "base")
    hf = transformers.FuyuForCausalLM.from_pretrained(tmp_path / "base")
    lc = peft.LoraConfig(r=4, lora_alpha=32, lora_dropout=0.05, target_modules=[
        "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"])
    made = peft.get_peft_model(hf, lc)
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    made.save_pretrained(tmp_path / "peft_adapter")

    cfg = _cfg(data_dir, tmp_path / "run", f"model.path={tmp_path / 'base'}", "lora.alpha=32",
               f"lora.init_from={tmp_path / 'peft_adapter'}", "train.max_steps=2")
    model = build_model_for(cfg, torch.device("cpu"))
    B = dict(adapters(model))["layers.0.self_attn.dense"].B
    ref = made.state_dict()["base_model.model.model.language_model.layers.0.self_attn.dense.lora_B.default.weight"]
    assert torch.equal(B, ref) and B.requires_grad
    ctx = _run(cfg, tmp_path / "ckpt")
    assert not (ctx.checkpoints[-1] / "base").exists()  # a real base (model.path) is never copied
    with pytest.raises(ValueError, match="lora.r"):
        build_model_for(_cfg(data_dir, tmp_path, f"lora.init_from={tmp_path / 'peft_adapter'}", "lora.r=8",
                             f"model.path={tmp_path / 'base'}"), torch.device("cpu"))


@pytest.mark.slow
def test_killed_ray_worker_with_lora_recovers(data_dir, tmp_path):
    ray = pytest.importorskip("ray")
    from otterhd_ray.finetune import finetune

    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        cfg = _cfg(data_dir, tmp_path, "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.max_failures=1",
                   f"ray.storage_path={tmp_path / 'ray'}", "ray.name=lora-kill", "train.checkpoint_every_steps=2",
                   "train.save_hf_model=true", "data.preprocess_batch_size=4", "faults.fail_at_step=3",
                   "faults.fail_rank=1", f"faults.fail_marker={tmp_path / 'killed.txt'}")
        outcome = finetune(cfg)
    finally:
        ray.shutdown()
    assert (tmp_path / "killed.txt").is_file() and outcome.result.checkpoint is not None
    history = _history(tmp_path)
    assert any(h["resumed_from_step"] == 2 for h in history)
    assert outcome.hf_dir == tmp_path / "hf" and (tmp_path / "hf" / "model.safetensors").is_file()
    assert outcome.adapter_dir == tmp_path / "adapter"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_demo_lora_config_trains_in_process_and_exports_both(tmp_path):
    """configs/finetune/demo_lora.yaml as committed (paths moved to tmp; in process, one epoch, for time), through
    the driver-side whole (`finetune`: demo data, train, export merged + adapter)."""
    from otterhd_ray.finetune import finetune

    root = Path(__file__).resolve().parents[2]
    cfg = load_finetune_config(root / "configs/finetune/demo_lora.yaml", [
        f"data.datasets=[{{name: synth, path: {tmp_path / 'data' / 'train'}, num_samples: 24}}]",
        f"data.tokenizer_path={tmp_path / 'tokenizer'}", f"data.rejects_path={tmp_path / 'rejects'}",
        f"data.index_cache_dir={tmp_path / 'index'}", f"ray.storage_path={tmp_path / 'ray'}",
        f"train.output_dir={tmp_path / 'out'}", "ray.num_workers=0", "train.epochs=1",
    ])
    assert cfg.lora.enabled and "lm_head" in cfg.lora.targets
    outcome = finetune(cfg)
    assert outcome.hf_dir == tmp_path / "out" / "hf" and (outcome.hf_dir / "model.safetensors").is_file()
    assert outcome.adapter_dir == tmp_path / "out" / "adapter"
    assert (outcome.adapter_dir / "adapter_config.json").is_file()
