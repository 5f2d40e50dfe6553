"""The training loop in-process (no Ray Train): engines, accumulation, resume, exactly-once epochs, export.

DeepSpeed runs here on CPU with gloo at world size 1 (the first use JIT-builds `deepspeed_shm_comm`, ~80 s on 2
cores; it is cached under TORCH_EXTENSIONS_DIR). Multi-worker Ray runs are in test_train_ray.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".venv" / "torch_extensions"))

from otterhd_ray.config import FinetuneConfig, load_finetune_config  # noqa: E402
from otterhd_ray.data.buckets import assemble  # noqa: E402
from otterhd_ray.models.fuyu import PackedBatch, flavour_config, new_model  # noqa: E402
from otterhd_ray.train.engine import build_engine  # noqa: E402
from otterhd_ray.train.loop import InjectedStop, LocalContext, train_loop_per_worker  # noqa: E402
from tests.helpers import data_overrides, reset_distributed, sample, synth_train_dir, train_rows  # noqa: E402

pytestmark = pytest.mark.timeout(300)
CFG = flavour_config("debug")


@pytest.fixture(scope="module", autouse=True)
def _release_process_group():
    """DeepSpeed initialises a 1-rank gloo group in this process: tear it down for the tests that follow."""
    yield
    reset_distributed()


# ------------------------------------------------------------------------------------------ engines
def _micro_batches() -> tuple[list[PackedBatch], PackedBatch]:
    rows = train_rows(CFG, seed=0)
    return [assemble(rows[:1]), assemble(rows[1:])], assemble(rows)


def _one_step(engine_cfg: dict, batches: list[PackedBatch], total_tokens: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = new_model(CFG, attention="eager")
    cfg = FinetuneConfig.model_validate({
        # eps=1: Adam's first update is lr*g/(|g|+eps); with the default 1e-8 it is ~lr*sign(g) and turns fp32
        # rounding noise of near-zero gradients into full-size differences. With eps=1 the update is ~lr*g.
        **engine_cfg, "optim": {"lr": 1e-2, "weight_decay": 0.1, "warmup_ratio": 0.0, "eps": 1.0},
        "train": {"gradient_accumulation_steps": len(batches), "precision": "fp32"},
    })
    engine = build_engine(model, cfg, 10, torch.device("cpu"), 1)
    for i, mb in enumerate(batches):
        loss_sum, _ = engine.forward(mb)
        engine.backward(loss_sum / total_tokens, is_boundary=i == len(batches) - 1)
    engine.step()
    if cfg.deepspeed.enabled and cfg.deepspeed.stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.model.parameters())):
            return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


ENGINES = {
    "torch": {"deepspeed": {"enabled": False}},
    "zero2": {"deepspeed": {"enabled": True, "stage": 2, "torch_adam": True}},
    "zero3": {"deepspeed": {"enabled": True, "stage": 3, "torch_adam": True}},
    # torch's fused AdamW handed to DeepSpeed as a client optimizer (the GPU default), forced on here on CPU
    "zero2_fused": {"deepspeed": {"enabled": True, "stage": 2, "torch_adam": True, "fused_torch_adam": True}},
    "zero3_fused": {"deepspeed": {"enabled": True, "stage": 3, "torch_adam": True, "fused_torch_adam": True}},
    "zero2_offload": {"deepspeed": {"enabled": True, "stage": 2, "torch_adam": True, "offload_optimizer": True}},
    "zero3_offload": {"deepspeed": {"enabled": True, "stage": 3, "torch_adam": True, "offload_optimizer": True,
                                    "offload_params": True}},
}


@pytest.mark.parametrize("name", list(ENGINES))
def test_accumulated_micro_steps_equal_one_big_batch(name):
    # Seed bug: its effective accumulation was 4 instead of the requested 2. Here 2 micro-batches accumulated
    # with the step's token normalisation give the same update as the one packed batch holding both.
    small, big = _micro_batches()
    tokens = big.num_target_tokens
    assert tokens == sum(mb.num_target_tokens for mb in small)
    accumulated = _one_step(ENGINES[name], small, tokens)
    single = _one_step(ENGINES[name], [big], tokens)
    reference = _one_step(ENGINES["torch"], [big], tokens)
    for key in single:
        torch.testing.assert_close(accumulated[key], single[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single[key], reference[key], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    fresh = new_model(CFG).state_dict()
    assert not torch.allclose(fresh["lm_head.weight"], single["lm_head.weight"])  # the step did update


# ------------------------------------------------------------------------------------------ the loop
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synth_train_dir(tmp_path_factory.mktemp("train_data"), num_train=20, num_bench=0, seed=3, rows_per_file=10)


def _cfg(data_dir: Path, out: Path, *overrides: str) -> FinetuneConfig:
    return load_finetune_config(None, [
        *data_overrides(data_dir),
        "data.max_tokens=512", "data.buckets.long_sides=[240]", "data.buckets.native=false",
        "optim.lr=2e-3", "optim.warmup_ratio=0.1", "optim.weight_decay=0.1",
        "train.epochs=2", "train.log_every_steps=1", "train.precision=fp32", "train.log_samples=true",
        f"train.output_dir={out}", "model.attention=eager",
        "deepspeed.stage=2", "deepspeed.torch_adam=true",
        *overrides,
    ])


def _run(cfg: FinetuneConfig, root: Path, resume_from=None) -> LocalContext:
    ctx = LocalContext(root, resume_from=resume_from)
    train_loop_per_worker({"config": cfg.model_dump(mode="json")}, ctx)
    return ctx


def _history(out: Path) -> list[dict]:
    """The metrics logged every `log_every_steps` (the JSONL sink; Ray only gets checkpoint reports)."""
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cfg = _cfg(data_dir, out, "train.checkpoint_every_steps=3", "train.gradient_accumulation_steps=2",
               "wandb.enabled=true", "wandb.mode=offline", "wandb.project=otterhd-test", "wandb.run_name=full")
    return cfg, _run(cfg, out / "ckpt"), out


def test_resume_reproduces_the_uninterrupted_loss_sequence(data_dir, tmp_path, full_run):
    _, _, full_out = full_run
    full_history = _history(full_out)
    losses = {r["step"]: r["loss"] for r in full_history}
    assert len(losses) >= 6
    cfg = _cfg(data_dir, tmp_path, "train.checkpoint_every_steps=3", "train.gradient_accumulation_steps=2")
    with pytest.raises(InjectedStop):  # crashes one step after the checkpoint at step 3
        _run(_cfg(data_dir, tmp_path, "train.checkpoint_every_steps=3", "train.gradient_accumulation_steps=2",
                  "faults.stop_after_step=4"), tmp_path / "ckpt")
    ckpt = sorted((tmp_path / "ckpt").glob("checkpoint_*"))[-1]  # what survived the crash
    assert ckpt.name == "checkpoint_000003"
    _run(cfg, tmp_path / "ckpt2", resume_from=ckpt)
    resumed = [r for r in _history(tmp_path) if r["resumed_from_step"] == 3]
    assert [r["step"] for r in resumed] == list(range(4, max(losses) + 1))
    for r in resumed:
        # same weights, optimizer moments, LR schedule, data position and RNG: the same losses to fp32 noise
        assert r["loss"] == pytest.approx(losses[r["step"]], rel=1e-5, abs=1e-6), r["step"]
        assert r["lr"] == pytest.approx(next(x["lr"] for x in full_history if x["step"] == r["step"]))


def test_each_epoch_sees_every_sample_once_in_a_new_order(full_run):
    cfg, full, out = full_run
    records = [json.loads(line) for line in (out / "samples" / "rank0.jsonl").read_text().splitlines()]
    by_epoch: dict[int, list[int]] = {}
    for rec in records:
        by_epoch.setdefault(rec["epoch"], []).extend(rec["sample_index"])
    assert sorted(by_epoch) == [0, 1]
    for epoch, seen in by_epoch.items():
        assert sorted(seen) == list(range(20)), epoch  # every accepted sample exactly once
    from otterhd_ray.data.mix import plan_epoch

    ids = [plan_epoch(cfg.data.datasets, cfg.data.seed, e) for e in (0, 1)]
    order0 = [ids[0].file_row[i] for i in range(20)]
    order1 = [ids[1].file_row[i] for i in range(20)]
    assert order0 != order1  # a new order each epoch
    assert _history(out)[-1]["lr"] == 0.0  # the schedule ended exactly at the last step
    last_step = _history(out)[-1]["step"]
    expected = list(range(3, last_step + 1, 3)) + ([last_step] if last_step % 3 else [])
    assert [r["step"] for r in full.reports] == expected  # Ray gets checkpoint reports only (every 3 + the end)


def test_loss_falls_and_metrics_are_complete(full_run):
    _, full, out = full_run
    history = _history(out)
    assert [h["step"] for h in history] == list(range(1, len(history) + 1))  # log_every_steps=1
    losses = [r["loss"] for r in history]
    assert losses[-1] < losses[0] - 0.05
    last = history[-1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "data_wait_fraction", "step", "epoch"):
        assert key in last and last[key] is not None
    assert last["mfu"] is None  # no peak FLOPs on CPU: omitted rather than invented
    assert last["samples_seen"] == 2 * 20  # global count, both epochs
    assert full.reports[-1] == last  # the final checkpoint carries the last window's metrics


def test_export_loads_in_transformers_with_identical_logits(full_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from otterhd_ray.export import export_checkpoint
    from otterhd_ray.models.fuyu import normalize_patches
    from otterhd_ray.train.checkpoint import consolidated_state_dict

    _, full, _ = full_run
    ckpt = full.checkpoints[-1]
    out = export_checkpoint(ckpt, tmp_path / "hf")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    hf = transformers.FuyuForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("|SPEAKER|") == hf.config.image_token_id

    from otterhd_ray.models.fuyu.config import FuyuModelConfig

    ours = new_model(FuyuModelConfig.from_hf_dict(json.loads((ckpt / "model_config.json").read_text())),
                     attention="eager")
    ours.load_state_dict(consolidated_state_dict(ckpt))
    ours.eval()
    ids, patches, _ = sample(CFG, 2, 3, 11, seed=1)
    is_image, is_newline = ids == CFG.image_token_id, ids == CFG.image_token_id + 1
    ids[is_image], ids[is_newline] = hf.config.image_token_id, tok.convert_tokens_to_ids("|NEWLINE|")
    with torch.no_grad():
        theirs = hf(input_ids=ids[None], image_patches=normalize_patches(patches)[None]).logits[0]
        mine = ours.logits(ours(ids, patches, torch.arange(len(ids)), torch.tensor([0, len(ids)], dtype=torch.int32),
                                len(ids)))
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_wandb_offline_run_is_written(full_run):
    _, _, out = full_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert list(runs[0].glob("*.wandb")), "no wandb event file"


def test_run_finetune_in_process_checkpoints_resumes_and_exports(data_dir, tmp_path, caplog):
    # ray.num_workers=0: the same loop in the driver process, checkpoints under storage_path/name.
    from otterhd_ray.finetune import finetune
    from otterhd_ray.train.trainer import run_finetune

    overrides = ["ray.num_workers=0", f"ray.storage_path={tmp_path / 'ray'}", "ray.name=inproc",
                 "train.max_steps=2", "train.checkpoint_every_steps=1", "train.save_hf_model=true"]
    outcome = finetune(_cfg(data_dir, tmp_path, *overrides))
    assert Path(outcome.result.checkpoint.path).name == "checkpoint_000002"
    assert outcome.hf_dir == tmp_path / "hf" and (tmp_path / "hf" / "model.safetensors").is_file()
    assert len(_history(tmp_path)) == 2
    # Run again with max_steps=3: it resumes from step 2, not from scratch... but the step budget changed,
    # so the schedule differs: refused with a clear error rather than silently training on a different one.
    with pytest.raises(ValueError, match="optimizer steps"):
        run_finetune(_cfg(data_dir, tmp_path, *overrides[:-3], "train.max_steps=3"))
    with caplog.at_level("WARNING", logger="otterhd_ray.train"):
        run_finetune(_cfg(data_dir, tmp_path, *overrides))  # same config: resumes at the end, trains nothing
    assert len(_history(tmp_path)) == 2
    assert "run 'inproc' already finished its 2 optimizer steps" in caplog.text  # said, not silent


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_deepspeed_step_runs(stage):
    # The GPU recipe's precision path (bf16 weights, fp32 masters in ZeRO), exercised on CPU.
    small, big = _micro_batches()
    torch.manual_seed(0)
    model = new_model(CFG, attention="eager", dtype=torch.bfloat16)
    cfg = FinetuneConfig.model_validate({
        "deepspeed": {"enabled": True, "stage": stage, "torch_adam": True},
        "train": {"precision": "bf16", "gradient_accumulation_steps": 2}, "optim": {"lr": 1e-2, "warmup_ratio": 0},
    })
    engine = build_engine(model, cfg, 10, torch.device("cpu"), 1)
    before = engine.lr
    for i, mb in enumerate(small):
        loss_sum, _ = engine.forward(mb)
        assert torch.isfinite(loss_sum)
        engine.backward(loss_sum / big.num_target_tokens, is_boundary=i == 1)
    norm = engine.step()
    assert torch.isfinite(norm) and float(norm) > 0
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert engine.lr < before  # the schedule advanced once per optimizer step


def test_bf16_torch_engine_step_runs_under_autocast():
    # The plain torch engine's bf16: float32 weights under autocast. With image patches this raised a dtype error
    # (bf16 patch projection scattered into float32 embeddings; the chunked loss's own matmuls) until fixed.
    small, big = _micro_batches()
    assert big.patches is not None and big.patches.shape[0] > 0
    torch.manual_seed(0)
    model = new_model(CFG, attention="sdpa")
    cfg = FinetuneConfig.model_validate({
        "deepspeed": {"enabled": False}, "train": {"precision": "bf16", "gradient_accumulation_steps": 2},
        "optim": {"lr": 1e-2, "warmup_ratio": 0},
    })
    engine = build_engine(model, cfg, 10, torch.device("cpu"), 1)
    for i, mb in enumerate(small):
        loss_sum, _ = engine.forward(mb)
        assert torch.isfinite(loss_sum) and loss_sum.dtype == torch.float32
        engine.backward(loss_sum / big.num_target_tokens, is_boundary=i == 1)
    norm = engine.step()
    assert torch.isfinite(norm) and float(norm) > 0
    assert next(engine.model.parameters()).dtype == torch.float32


def test_mfu_flops_count_survives_zero3_partitioning():
    from otterhd_ray.train.metrics import flops_per_token

    torch.manual_seed(0)
    model = new_model(CFG, attention="eager")
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and n != "embed_tokens.weight")
    expected = 6 * matmul + 6 * CFG.num_layers * CFG.hidden_size * 100.0
    assert flops_per_token(model, 100.0) == expected
    cfg = FinetuneConfig.model_validate({"deepspeed": {"enabled": True, "stage": 3, "torch_adam": True},
                                         "train": {"precision": "fp32"}})
    engine = build_engine(model, cfg, 10, torch.device("cpu"), 1)
    assert flops_per_token(engine.model, 100.0) == expected  # from ds_shape, not the empty local shards


def test_checkpoint_at_end_off_saves_nothing(data_dir, tmp_path):
    """Throughput runs (8B width on a small disk) switch the final checkpoint off; periodic ones still work."""
    cfg = _cfg(data_dir, tmp_path / "out", "train.checkpoint_at_end=false", "train.epochs=1")
    ctx = _run(cfg, tmp_path / "ckpt")
    assert ctx.checkpoints == []
    assert _history(tmp_path / "out")[-1]["step"] > 0
    cfg = _cfg(data_dir, tmp_path / "out2", "train.checkpoint_at_end=false", "train.epochs=1",
               "train.checkpoint_every_steps=2")
    ctx = _run(cfg, tmp_path / "ckpt2")
    assert [p.name for p in ctx.checkpoints][:1] == ["checkpoint_000002"]


@pytest.mark.parametrize("fused", [True, False])
def test_fused_torch_adam_switch_reaches_deepspeed(fused):
    cfg = FinetuneConfig.model_validate({
        "deepspeed": {"enabled": True, "stage": 2, "torch_adam": True, "fused_torch_adam": fused},
        "train": {"precision": "fp32"},
    })
    engine = build_engine(new_model(CFG, attention="eager"), cfg, 10, torch.device("cpu"), 1)
    inner = engine.ds_engine.optimizer.optimizer  # ZeRO's wrapper around the torch optimizer
    assert isinstance(inner, torch.optim.AdamW)
    assert bool(inner.defaults.get("fused")) is fused


def test_a_restart_marks_its_records_with_the_next_attempt(data_dir, tmp_path):
    """Steps replayed after a restart are not ambiguous duplicates: metrics.jsonl and the sample ledger carry
    the attempt that wrote them; the run ends with loss.png beside its metrics."""
    cfg = _cfg(data_dir, tmp_path, "train.checkpoint_every_steps=2", "train.epochs=1")
    with pytest.raises(InjectedStop):  # logged step 3, checkpoint at step 2
        _run(_cfg(data_dir, tmp_path, "train.checkpoint_every_steps=2", "train.epochs=1",
                  "faults.stop_after_step=3"), tmp_path / "ckpt")
    ckpt = sorted((tmp_path / "ckpt").glob("checkpoint_*"))[-1]
    _run(cfg, tmp_path / "ckpt2", resume_from=ckpt)
    history = _history(tmp_path)
    pairs = [(r["step"], r["attempt"]) for r in history]
    assert len(set(pairs)) == len(pairs)
    assert [a for s, a in pairs if s == 3] == [0, 1]  # step 3 ran twice: once per attempt
    assert {a for s, a in pairs if s > 3} == {1}
    ledger = [json.loads(x) for x in (tmp_path / "samples" / "rank0.jsonl").read_text().splitlines()]
    replayed = [r for r in ledger if r["step"] == 2]  # the ledger's step is 0-based: step 3 above
    assert [r["attempt"] for r in replayed] == [0, 1]
    assert replayed[0]["sample_index"] == replayed[1]["sample_index"]  # the same samples, replayed
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
