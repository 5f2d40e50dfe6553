"""Evaluation inside the training job (`eval:`): it runs on the training model at the configured steps, scores
with the benchmark's metric, reaches every sink, and leaves training exactly as it was without it.

In-process runs (`LocalContext`, the real pipeline and debug model) compare a run with evaluation against one
without: the same per-sample audit, the same loss / lr / grad-norm sequence, the same checkpoints (weights, data
position, RNG files). The model of those runs draws from the torch RNG in training (a dropout stand-in) and
during generation, and trains differently in eval mode, so evaluation that leaked RNG draws or left the model
in eval mode would change the losses; a LoRA run (the config's model, adapter dropout) checks the same with the
real dropout. ZeRO-3 (weights gathered for generation, hooks lifted) runs in-process
at world size 1 and on Ray with two ranks holding unequal item counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".venv" / "torch_extensions"))

from otterhd_ray.config import ConfigError, FinetuneConfig, load_finetune_config  # noqa: E402
from otterhd_ray.models.fuyu import FuyuForCausalLM, flavour_config  # noqa: E402
from otterhd_ray.train.evaluation import answer_items, due, load_items  # noqa: E402
from otterhd_ray.train.loop import InjectedStop, LocalContext, train_loop_per_worker  # noqa: E402
from tests.helpers import data_overrides, reset_distributed, synth_train_dir  # noqa: E402

pytestmark = pytest.mark.timeout(600)
NUM_TRAIN, NUM_BENCH, EVAL_ITEMS = 16, 7, 5
EVAL = ("eval.max_items=5", "eval.every_n_steps=2", "eval.at_epoch_end=true", "eval.at_end=true",
        "eval.max_new_tokens=4", "eval.resolution=60", "eval.batch_size=2")


@pytest.fixture(scope="module", autouse=True)
def _release_process_group():
    reset_distributed()  # an earlier module may have left DeepSpeed's 1-rank group behind
    yield
    reset_distributed()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synth_train_dir(tmp_path_factory.mktemp("train_eval_data"), num_train=NUM_TRAIN, num_bench=NUM_BENCH, seed=4, rows_per_file=8)


def _cfg(data_dir: Path, out: Path, *overrides: str) -> FinetuneConfig:
    return load_finetune_config(None, [
        *data_overrides(data_dir),
        "data.max_tokens=512", "data.buckets.long_sides=[240]", "data.buckets.native=false",
        "optim.lr=2e-3", "optim.warmup_ratio=0.1", "train.epochs=2", "train.log_every_steps=1",
        "train.precision=fp32", "train.log_samples=true", "train.checkpoint_every_steps=3",
        f"train.output_dir={out}", "model.attention=eager", "deepspeed.torch_adam=true",
        *overrides,
    ])


def _with_eval(data_dir: Path, *overrides: str) -> tuple[str, ...]:
    return (f"eval.data_path={data_dir / 'magnifierbench'}", *EVAL, *overrides)


class NoisyFuyu(FuyuForCausalLM):
    """Draws from the torch RNG in training (its loss is scaled by a random factor, like dropout) and while
    generating, and trains differently in eval mode: leaked RNG state or a model left in eval() shows up in
    the losses."""

    generate_calls = 0

    def loss(self, batch):
        loss_sum, num = super().loss(batch)
        noise = torch.rand((), device=loss_sum.device) if self.training else torch.zeros((), device=loss_sum.device)
        return loss_sum * (1.0 + 0.05 * noise), num

    def generate(self, *args, **kwargs):
        assert not self.training, "evaluation must run in eval mode"
        torch.rand(7)  # a draw the training run must never see
        NoisyFuyu.generate_calls += 1
        return super().generate(*args, **kwargs)


def _noisy_model(cfg: FinetuneConfig, device: torch.device) -> FuyuForCausalLM:
    return NoisyFuyu(flavour_config("debug"), attention="eager").to(device)


def _run(cfg: FinetuneConfig, root: Path, resume_from: Path | None = None) -> LocalContext:
    ctx = LocalContext(root, resume_from=resume_from)
    factory = None if cfg.lora.enabled else _noisy_model
    train_loop_per_worker({"config": cfg.model_dump(mode="json")}, ctx, model_factory=factory)
    return ctx


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


TRAINING_KEYS = ("step", "epoch", "loss", "lr", "grad_norm", "samples_seen", "tokens_seen", "target_tokens")


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from otterhd_ray.train.checkpoint import consolidated_state_dict

    return consolidated_state_dict(ckpt)


ENGINES = {
    "torch": ("deepspeed.enabled=false",),
    "zero3": ("deepspeed.enabled=true", "deepspeed.stage=3"),
    # the config's own model with LoRA dropout (the draw evaluation must not disturb) instead of NoisyFuyu
    "lora": ("deepspeed.enabled=false", "lora.enabled=true", "lora.r=4", "lora.dropout=0.2"),
}


@pytest.fixture(scope="module", params=list(ENGINES))
def pair(request, data_dir, tmp_path_factory):
    """The same run without and with `eval:`."""
    engine = ENGINES[request.param]
    plain_out, eval_out = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("with_eval")
    plain = _run(_cfg(data_dir, plain_out, *engine), plain_out / "ckpt")
    calls = NoisyFuyu.generate_calls
    evaluated = _run(_cfg(data_dir, eval_out, *engine, *_with_eval(data_dir)), eval_out / "ckpt")
    assert request.param == "lora" or NoisyFuyu.generate_calls > calls, "evaluation never generated"
    return request.param, (plain, plain_out), (evaluated, eval_out)


def test_training_is_identical_with_and_without_evaluation(pair):
    _, (plain, plain_out), (evaluated, eval_out) = pair
    # the per-sample audit: the same samples at the same steps and ranks
    assert (eval_out / "samples" / "rank0.jsonl").read_text() == (plain_out / "samples" / "rank0.jsonl").read_text()
    # the same training metrics, exactly (a leaked RNG draw or eval mode would change the noisy losses)
    strip = [{k: h[k] for k in TRAINING_KEYS} for h in _jsonl(plain_out / "metrics.jsonl")]
    assert [{k: h[k] for k in TRAINING_KEYS} for h in _jsonl(eval_out / "metrics.jsonl")] == strip
    assert len(strip) >= 6
    # the same checkpoints: steps, loop state, per-rank RNG files and weights
    assert [p.name for p in evaluated.checkpoints] == [p.name for p in plain.checkpoints]
    for a, b in zip(plain.checkpoints, evaluated.checkpoints, strict=True):
        assert (a / "train_state.json").read_text() == (b / "train_state.json").read_text()
        rng_a, rng_b = (torch.load(c / "rng_rank0.pt", weights_only=False) for c in (a, b))
        assert torch.equal(rng_a["torch"], rng_b["torch"]) and rng_a["python"] == rng_b["python"]
        wa, wb = _weights(a), _weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), a.name


def test_evaluations_run_at_the_configured_steps_and_reach_the_sinks(pair):
    _, _, (evaluated, out) = pair
    history = _jsonl(out / "metrics.jsonl")
    total = history[-1]["step"]
    epoch_ends = sorted({h["step"] for h in history if h["step"] == total or
                         next((x for x in history if x["step"] == h["step"] + 1), {}).get("epoch") != h["epoch"]})
    evals = _jsonl(out / "eval_metrics.jsonl")
    expected = sorted(set(range(2, total + 1, 2)) | set(epoch_ends))
    assert [e["step"] for e in evals] == expected
    for e in evals:
        assert e["eval/benchmark"] == "magnifierbench" and e["eval/num_items"] == EVAL_ITEMS
        assert e["eval/num_failed"] == 0 and e["resumed_from_step"] == 0
        assert 0.0 <= e["eval/magnifierbench/mc_accuracy"] <= 1.0
        assert e["eval/trigger"] == ("end" if e["step"] == total else
                                     "epoch_end" if e["step"] in epoch_ends else "every_n_steps")
        per_item = _jsonl(out / "eval" / f"step_{e['step']:06d}.jsonl")
        assert len({r["id"] for r in per_item}) == EVAL_ITEMS  # the same first five items every time
        correct = sum(r["mc_correct"] for r in per_item)
        assert e["eval/magnifierbench/mc_accuracy"] == pytest.approx(correct / EVAL_ITEMS)
    # reports: an evaluation at a checkpoint step rides on the checkpoint's report, others are reported alone
    by_step = {}
    for r in evaluated.reports:
        by_step.setdefault(r["step"], []).append(r)
    final = by_step[total][-1]
    assert final["eval/magnifierbench/mc_accuracy"] == evals[-1]["eval/magnifierbench/mc_accuracy"]
    assert final["loss"] == history[-1]["loss"]  # ... next to the training metrics of that step
    assert [len(by_step[s]) for s in expected] == [1] * len(expected)


def test_the_final_evaluation_matches_the_evaluate_path_on_the_exported_checkpoint(pair, tmp_path):
    """The in-training answers equal `otterhd evaluate`'s predictor on the exported weights: the evaluation saw
    the trained (under ZeRO-3: gathered) weights, with the same prompts."""
    from otterhd_ray.eval.predictor import Predictor
    from otterhd_ray.export import export_checkpoint

    name, _, (evaluated, out) = pair
    final_step = evaluated.checkpoints[-1]
    hf = export_checkpoint(final_step, tmp_path / "hf")
    predictor = Predictor(str(hf), resolution=60, max_new_tokens=4, device="cpu", dtype="fp32")
    records = {r["id"]: r for r in _jsonl(out / "eval" / f"step_{int(final_step.name.split('_')[1]):06d}.jsonl")}
    cfg = FinetuneConfig.model_validate_json((final_step / "finetune_config.json").read_text())
    _, loaded = load_items(cfg.eval)
    answered, failed = answer_items(predictor, loaded.items, cfg.eval.model_name, cfg.eval.batch_size)
    assert not failed and len(records) == EVAL_ITEMS
    assert answered == {i: r["responses"] for i, r in records.items()}, name


def test_resume_evaluates_only_its_own_steps_and_marks_repeats(data_dir, tmp_path, pair):
    name, _, (_, full_out) = pair
    if name != "torch":
        pytest.skip("resume is engine-independent here; the torch engine keeps it fast")
    full = {e["step"]: e for e in _jsonl(full_out / "eval_metrics.jsonl")}
    overrides = (*ENGINES["torch"], *_with_eval(data_dir))
    with pytest.raises(InjectedStop):  # evaluates at step 4, then dies before the next checkpoint (step 6)
        _run(_cfg(data_dir, tmp_path, *overrides, "faults.stop_after_step=4"), tmp_path / "ckpt")
    ckpt = sorted((tmp_path / "ckpt").glob("checkpoint_*"))[-1]
    assert ckpt.name == "checkpoint_000003"
    _run(_cfg(data_dir, tmp_path, *overrides), tmp_path / "ckpt2", resume_from=ckpt)
    evals = _jsonl(tmp_path / "eval_metrics.jsonl")
    first = [e["step"] for e in evals if e["resumed_from_step"] == 0]
    again = [e["step"] for e in evals if e["resumed_from_step"] == 3]
    assert first == [s for s in full if s <= 4]
    assert again == [s for s in full if s > 3]  # nothing at or before the checkpoint is evaluated again
    assert 4 in first and 4 in again  # the one step evaluated twice is told apart by resumed_from_step
    for e in evals:  # the resumed model is the uninterrupted one: the same scores
        assert e["eval/magnifierbench/mc_accuracy"] == full[e["step"]]["eval/magnifierbench/mc_accuracy"]


# ------------------------------------------------------------------------------------------ config
def test_eval_section_is_typed_and_checked(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'eval.every_n_step'"):
        load_finetune_config(None, ["eval.every_n_step=2"])
    with pytest.raises(ConfigError, match="every_n_steps, at_epoch_end or at_end"):
        load_finetune_config(None, ["eval.at_epoch_end=false", "eval.at_end=false"])
    with pytest.raises(ConfigError, match="judge"):
        load_finetune_config(None, ["eval.judge=openai"])
    assert load_finetune_config(None, []).eval is None  # off unless configured
    from otterhd_ray.train.trainer import check_inputs, resolve_paths

    base = _cfg(data_dir, tmp_path)
    with pytest.raises(ValueError, match="eval.benchmark: unknown benchmark 'magnifier'"):
        check_inputs(_cfg(data_dir, tmp_path, "eval.benchmark=magnifier"))
    with pytest.raises(ValueError, match="eval.data_path"):
        check_inputs(_cfg(data_dir, tmp_path, f"eval.data_path={tmp_path / 'nowhere'}"))
    check_inputs(_cfg(data_dir, tmp_path, f"eval.data_path={data_dir / 'magnifierbench'}"))  # fine
    assert base.eval is None
    rel = resolve_paths(_cfg(data_dir, tmp_path, "eval.data_path=some/local/dir")).eval.data_path
    assert Path(rel).is_absolute()  # workers do not share the driver's working directory
    assert resolve_paths(_cfg(data_dir, tmp_path, "eval.data_path=owner/name")).eval.data_path == "owner/name"


def test_due_names_the_trigger():
    cfg = load_finetune_config(None, ["eval.every_n_steps=3", "eval.at_epoch_end=true", "eval.at_end=true"]).eval
    assert [due(cfg, s, epoch_ended=s == 4, is_last=s == 7) for s in range(1, 8)] == [
        None, None, "every_n_steps", "epoch_end", None, "every_n_steps", "end"]
    quiet = load_finetune_config(None, ["eval.at_epoch_end=false", "eval.at_end=true"]).eval
    assert [due(quiet, s, epoch_ended=True, is_last=s == 2) for s in (1, 2)] == [None, "end"]


# --------------------------------------------------------------------------------------------- Ray
@pytest.mark.slow
def test_zero3_two_ray_workers_shard_items_and_report(data_dir, tmp_path):
    """Two ranks with unequal shares (5 items: 3 + 2) under ZeRO-3 on Ray Train: no collective hangs, every
    item is scored once, and the scores reach `ray.train.report` and Prometheus."""
    ray = pytest.importorskip("ray")
    import urllib.request

    from otterhd_ray.train.trainer import run_finetune

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        cfg = _cfg(data_dir, tmp_path / "out", "deepspeed.stage=3", "ray.num_workers=2", "ray.cpus_per_worker=1",
                   f"ray.storage_path={tmp_path / 'ray'}", "ray.name=eval-zero3", "train.max_steps=3",
                   "data.preprocess_batch_size=4",
                   *_with_eval(data_dir, "eval.every_n_steps=0", "eval.at_epoch_end=false"))
        result = run_finetune(cfg)
        assert result.metrics["eval/num_items"] == EVAL_ITEMS and result.metrics["step"] == 3
        per_item = _jsonl(tmp_path / "out" / "eval" / "step_000003.jsonl")
        assert sorted(r["id"] for r in per_item) == sorted({r["id"] for r in per_item}) and len(per_item) == 5
        port = ray._private.worker._global_node.metrics_export_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "ray_otterhd_train_eval_score" in text
    finally:
        if started_here:
            ray.shutdown()
