"""Loss-curve parity: our training loop vs a plain transformers `FuyuForCausalLM` loop (issue 13, item 1).

    python3 benchmarks/convergence.py --noise-floor --budget-s 400 --out $OUT   # GPU: bf16, study, 300 steps
    python benchmarks/convergence.py --smoke --out /tmp/conv                    # CPU: fp32, debug model, 20 steps
    python benchmarks/convergence.py --precision bf16 --noise-floor --flavour demo --layers 4 --max-tokens 512 \
        --long-side 240 --samples 450 --steps 300 --threads 2 --out /tmp/conv   # CPU bf16 pre-check (~3 min)

Both runs start from the same weights (one random init saved as an HF directory, loaded by both), see the same
samples in the same order, and use the same optimizer and schedule:

  ours      : `train_loop_per_worker` in this process (a `LocalContext`, no Ray): the input pipeline's packed
              micro-batches (bucketed resize, no padding), the model's fused ops / varlen attention, DeepSpeed
              ZeRO-2, one micro-batch per optimizer step, loss logged every step;
  reference : transformers `FuyuForCausalLM`, each step's samples (the ids ours trained on, recorded from the
              data source) built by transformers' `FuyuProcessor` from the decoded image resized to the same
              bucket, answers appended as the seed's recipe does (" answer" + end token, labels on answers),
              right-padded into one batch, `labels=` loss (mean over the step's supervised tokens, the same
              normalisation as ours), torch AdamW with the same groups, a LambdaLR written out here from the
              schedule's definition, the same clipping.

Precision (`--precision`: auto = bf16 on GPU, fp32 on CPU and in --smoke; bf16 also runs on CPU). In bf16:
  ours                      : DeepSpeed bf16 — the module's weights are bf16, the optimizer updates fp32 master
                              copies (ZeRO-2 partitions) and copies them back rounded; the whole forward is bf16
                              (embeddings, the residual stream, LayerNorm outputs, rotary, attention, logits); the
                              cross-entropy is taken in fp32 from the bf16 logits; gradients come out in bf16.
  reference, --reference-weights bf16 (default): the same scheme with plain torch (`MasterWeights`: bf16 module,
                              AdamW on fp32 masters, copied back rounded) — what HF's Trainer runs under DeepSpeed
                              bf16. Only the implementations differ (padded vs packed, op order, kernels, fused
                              glue on GPU): the comparison this benchmark is for.
  reference, --reference-weights autocast: fp32 weights, forward under `torch.autocast(bf16)` (HF Trainer's
                              `bf16=True` without DeepSpeed): matmuls and attention in bf16 from weights cast per
                              call, but embeddings, the residual stream and LayerNorms in fp32. Another numeric
                              scheme: it differs from ours by ~1e-3 from the first steps on (measured below), on
                              top of any implementation difference.
  The fair comparison holds the numeric scheme fixed and varies the implementation, so the default puts the
  reference in ours' scheme; putting ours in autocast instead is not our real loop (DeepSpeed's bf16 mode needs a
  bf16 module). In bf16 the shared init is rounded to bf16 values (see `prepare`), so every side starts from the
  same weights. `--noise-floor` also trains ours and the reference in fp32 and the reference in the other bf16
  scheme on the same samples and reports every pair: each side's bf16-vs-fp32 gap is the rounding noise it
  carries by itself, which bounds what parity in bf16 can show; `--budget-s` skips these runs when they would
  not fit (their cost is estimated from the main runs' times).

Measured (docs/benchmarks.md, section 10; CPU, 2026-12-01): fp32 smoke 20 steps max 5.7e-7. bf16 pre-check
(demo flavour, 4 layers, 512 tokens/step, 300 steps): see there; parity sits at each side's own bf16 noise, an
order of magnitude under the GPU target (median relative difference <= 1 % over the last 100 steps).

GPU time (one H200, study flavour, 300 steps of ~1,960 tokens, ~8.4 samples/step): CPU work measured on this
sandbox (one core): synthesis of 512 samples + init 10 s, our pipeline's in-process decode ~90 ms/step (27 s per
300 steps, per run of ours), FuyuProcessor on 512 samples 25 s (once). GPU work is small (~1.1 TFLOP per step);
torch.compile of the fused glue (per dtype) and DeepSpeed set-up dominate a run of ours. Estimate: main pair
~3-4 min, --noise-floor ~2-3 min more; `--budget-s 400` under `timeout 520` keeps a 600 s call safe, and
`convergence.json` is written after the main pair, so a killed noise-floor phase loses nothing else.

Reports per-step losses of both, their relative difference (|ours - ref| / ref), the median over the last 100
steps, a PNG of both curves and the difference (matplotlib; without it only the JSON), and `convergence.json`.
`tests/parity/test_convergence.py` runs `--smoke` in fp32 (must agree to 1e-4) and in bf16 (same scheme, 1e-3).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otterhd_ray.config import FinetuneConfig, load_finetune_config  # noqa: E402
from otterhd_ray.data.pipeline import MicroBatch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, debug model, 20 steps")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; smoke 20)")
    p.add_argument("--samples", type=int, default=None, help="synthetic training rows (default 512; smoke 40)")
    p.add_argument("--flavour", default=None, help="model flavour (default study; smoke debug)")
    p.add_argument("--layers", type=int, default=None, help="override the flavour's depth")
    p.add_argument("--max-tokens", type=int, default=None, help="packed tokens per step (default 2048; smoke 256)")
    p.add_argument("--long-side", type=int, default=None, help="resize long side (default 448; smoke 120)")
    p.add_argument("--lr", type=float, default=None, help="peak LR (default 3e-4; smoke 1e-3)")
    p.add_argument("--engine", choices=("auto", "deepspeed", "torch"), default="auto",
                   help="ours: DeepSpeed ZeRO-2 when importable (auto), else the plain torch engine")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="both sides: auto = bf16 on GPU, fp32 on CPU (and in --smoke)")
    p.add_argument("--reference-weights", choices=("autocast", "bf16"), default="bf16",
                   help="reference in bf16: fp32 weights + autocast (HF Trainer bf16=True), or bf16 weights with "
                   "fp32 masters in the optimizer (the scheme of ours and of HF Trainer under DeepSpeed)")
    p.add_argument("--noise-floor", action="store_true",
                   help="bf16 only: also train ours and the reference in fp32 and the reference in the other bf16 "
                   "scheme on the same samples, and report every pair (what parity in bf16 can be expected to reach)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="skip --noise-floor when the time spent plus its expected time (from the main runs) "
                   "would pass this many seconds (0: no limit)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--work", default=None, help="work dir (default: a temporary one)")
    p.add_argument("--out", default=os.environ.get("OUT") or "convergence_out", help="results dir")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = {"steps": (300, 20), "samples": (512, 40), "flavour": ("study", "debug"),
                "max_tokens": (2048, 256), "long_side": (448, 120), "lr": (3e-4, 1e-3)}
    for key, (gpu_value, smoke_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke_value if smoke else gpu_value)
    return args


# ------------------------------------------------------------------------------------------------ set-up
def prepare(work: Path, args: argparse.Namespace, precision: str) -> Path:
    """Synthetic shards, the tiny tokenizer, and the shared initial weights (an HF directory).

    In bf16 the weights are rounded to bf16 values (saved as float32): ours loads them into a bf16 module, and
    from unrounded float32 weights it would start elsewhere than an autocast reference, which keeps them. A real
    fine-tune starts from a bf16 checkpoint anyway (Fuyu-8B ships in bf16)."""
    from otterhd_ray.data.synth import synthesize
    from otterhd_ray.data.tokenizer import build_tiny_tokenizer
    from otterhd_ray.models.fuyu import save_hf
    from otterhd_ray.models.fuyu.config import config_for_tokenizer, flavour_config
    from otterhd_ray.models.fuyu.model import new_model

    # easy level in smoke mode: small frames synthesise in milliseconds; the GPU run uses MagnifierBench-like ones
    synthesize(work / "data", num_train=args.samples, num_bench=0, seed=0,
               level="easy" if args.smoke else "standard")
    tokenizer = build_tiny_tokenizer(work / "tokenizer")
    model_cfg = config_for_tokenizer(flavour_config(args.flavour), tokenizer)
    if args.layers:
        model_cfg = model_cfg.replace(num_layers=args.layers)
    torch.manual_seed(1234)
    init = work / "init"
    model = new_model(model_cfg)
    if precision == "bf16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16))
    save_hf(model, init)
    return init


def use_gpu(args: argparse.Namespace) -> bool:
    return torch.cuda.is_available() and not args.smoke


def resolve_precision(args: argparse.Namespace) -> str:
    return ("bf16" if use_gpu(args) else "fp32") if args.precision == "auto" else args.precision


def make_config(
    work: Path, init: Path, args: argparse.Namespace, engine: str, epochs: int, precision: str, name: str = "ours"
) -> FinetuneConfig:
    gpu = use_gpu(args)
    return load_finetune_config(None, [
        f"data.datasets=[{{name: synth, path: {work / 'data' / 'train'}}}]",
        f"data.tokenizer_path={work / 'tokenizer'}", f"data.index_cache_dir={work / 'index'}",
        f"data.max_tokens={args.max_tokens}",
        # one deterministic size per image (the reference resizes to the same one) and a full decode: the
        # JPEG draft decode is a fast path of ours with no transformers counterpart
        "data.buckets.mode=nearest", f"data.buckets.long_sides=[{args.long_side}]", "data.buckets.native=false",
        "data.draft_decode=false",
        f"model.path={init}", f"optim.lr={args.lr}", "optim.weight_decay=0.1", "optim.warmup_ratio=0.05",
        "optim.scheduler=linear", "optim.grad_clip=1.0",
        f"deepspeed.enabled={str(engine == 'deepspeed').lower()}", "deepspeed.stage=2",
        f"train.precision={precision}", f"train.epochs={epochs}", f"train.max_steps={args.steps}",
        "train.gradient_accumulation_steps=1", "train.log_every_steps=1", "train.checkpoint_at_end=false",
        f"train.output_dir={work / name}", f"ray.use_gpu={str(gpu).lower()}", "ray.num_workers=0",
    ])


def pick_engine(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return "torch"
    return "deepspeed"


# -------------------------------------------------------------------------------------------------- ours
class RecordingSource:
    """Wraps the pipeline's data source and records the sample ids of every micro-batch in training order."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.micro_batches: list[list[str]] = []

    def num_micro_batches(self, epoch: int) -> int:
        return self.inner.num_micro_batches(epoch)

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[MicroBatch]:
        for mb in self.inner.iter_epoch(epoch, start):
            # "#r<k>" marks a repeat of a sample within a mix; the row is the same (a filler has no sample id)
            self.micro_batches.append([s.split("#r")[0] for s in mb.sample_id])
            yield mb


def run_ours(cfg: FinetuneConfig) -> dict[str, Any]:
    from otterhd_ray.train.loop import LocalContext, build_data_source, train_loop_per_worker

    sources: list[RecordingSource] = []

    def data_factory(c: FinetuneConfig, rank: int, world: int) -> RecordingSource:
        sources.append(RecordingSource(build_data_source(c, rank, world)))
        return sources[-1]

    t0 = time.perf_counter()
    train_loop_per_worker({"config": cfg.model_dump()}, LocalContext(Path(cfg.train.output_dir) / "ckpt"),
                          data_source_factory=data_factory)
    seconds = time.perf_counter() - t0
    history = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    history = sorted({h["step"]: h for h in history}.values(), key=lambda h: h["step"])
    steps = sources[-1].micro_batches[: len(history)]
    return {"loss": [h["loss"] for h in history], "lr": [h["lr"] for h in history], "samples": steps,
            "seconds": seconds}


# --------------------------------------------------------------------------------------------- reference
def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """The linear schedule's definition (docs: warm-up `(s+1)/(w+1)` for `w = ceil(ratio * total)` steps, then
    linear to 0 at `total`), written out here rather than imported: the reference must not share our code."""
    warmup = min(total, math.ceil(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 1.0 - min(1.0, (step - warmup) / max(1, total - warmup))


class ReferenceData:
    """Raw rows by id -> what a transformers user builds: `FuyuProcessor` output + the seed's answer layout."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        import pyarrow.parquet as pq
        import transformers

        from otterhd_ray.data.buckets import BucketPolicy
        from otterhd_ray.data.tokenizer import load_tokenizer

        self.rows: dict[str, dict[str, Any]] = {}
        for path in sorted(Path(cfg.data.datasets[0].path).glob("*.parquet")):
            for row in pq.read_table(path, columns=["id", "image", "conversations"]).to_pylist():
                self.rows[row["id"]] = row
        self.tokenizer = load_tokenizer(cfg.data.tokenizer_path)
        self.processor = transformers.FuyuProcessor(
            image_processor=transformers.FuyuImageProcessor(), tokenizer=load_tokenizer(cfg.data.tokenizer_path)
        )
        vocab = self.tokenizer.get_vocab()
        self.end_id = vocab.get("|ENDOFTEXT|", self.tokenizer.eos_token_id)
        self.template = cfg.data.instruction_template
        self.policy = BucketPolicy(cfg.data.buckets)  # the *size* policy is ours by definition; pixels are HF's
        self._cache: dict[str, tuple[list[int], list[int], torch.Tensor]] = {}

    def sample(self, sample_id: str) -> tuple[list[int], list[int], torch.Tensor]:
        if sample_id not in self._cache:
            self._cache[sample_id] = self._build(self.rows[sample_id])
        return self._cache[sample_id]

    def _build(self, row: dict[str, Any]) -> tuple[list[int], list[int], torch.Tensor]:
        from PIL import Image
        from transformers.image_utils import load_image

        image = load_image(Image.open(io.BytesIO(row["image"])))  # EXIF transpose + RGB, as HF users load
        h, w = self.policy.size_for((image.height, image.width), 0.0)
        image = image.resize((w, h), resample=Image.Resampling.BILINEAR)
        turns = [(row["conversations"][i]["text"], row["conversations"][i + 1]["text"])
                 for i in range(0, len(row["conversations"]), 2)]
        first = self.template.replace("{instruction}", turns[0][0])
        enc = self.processor(images=image, text=first, return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        labels = [-100] * len(ids)
        for k, (question, answer) in enumerate(turns):
            if k:
                prompt = self.tokenizer(self.template.replace("{instruction}", question) + "<0x04>",
                                        add_special_tokens=False)["input_ids"]
                ids += prompt
                labels += [-100] * len(prompt)
            answer_ids = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [self.end_id]
            ids += answer_ids
            labels += answer_ids
        # one image: transformers squeezes the batch dim (and a one-patch image to [2700])
        return ids, labels, torch.as_tensor(enc["image_patches"]).reshape(-1, 2700)

    def batch(self, sample_ids: list[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Right-padded batch (positions 0.. per row, as transformers computes them without a cache); the patches
        in the weights' `dtype`, as `BatchFeature.to(device, dtype)` gives a transformers user."""
        built = [self.sample(s) for s in sample_ids]
        width = max(len(ids) for ids, _, _ in built)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(built), width), pad, dtype=torch.long)
        labels = torch.full((len(built), width), -100, dtype=torch.long)
        mask = torch.zeros((len(built), width), dtype=torch.long)
        for r, (ids, lab, _) in enumerate(built):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            mask[r, : len(ids)] = 1
        # The model scatters patches into the |SPEAKER| positions in row-major order: concatenating the rows'
        # patch lists in batch order is that order.
        patches = torch.cat([p for _, _, p in built])[None]
        return {"input_ids": input_ids.to(device), "labels": labels.to(device),
                "attention_mask": mask.to(device), "image_patches": patches.to(device, dtype)}


class MasterWeights:
    """fp32 master copies of a bf16 module's parameters, which the optimizer updates: DeepSpeed's bf16 mode
    (what our loop runs, and what HF's Trainer runs under DeepSpeed), written out here with plain torch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.pairs = [(p, p.detach().float().clone().requires_grad_(True)) for p in model.parameters()]
        self.master = {id(p): m for p, m in self.pairs}

    def grads_to_master(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)  # round to nearest even, as DeepSpeed's copy back


def run_reference(
    cfg: FinetuneConfig, data: ReferenceData, steps: list[list[str]], device: torch.device, precision: str,
    weights: str,
) -> dict[str, Any]:
    """The plain transformers loop. `precision` fp32: everything fp32. bf16 with `weights` "autocast": fp32
    weights, the forward under `torch.autocast(bf16)` (HF Trainer's `bf16=True`); "bf16": bf16 weights, no
    autocast, AdamW on fp32 master copies (`MasterWeights`; HF Trainer under DeepSpeed bf16, and our loop)."""
    import transformers

    master = precision == "bf16" and weights == "bf16"
    model = transformers.FuyuForCausalLM.from_pretrained(
        cfg.model.path, attn_implementation="sdpa", dtype=torch.bfloat16 if master else torch.float32
    ).to(device)
    model.train()
    masters = MasterWeights(model) if master else None
    named = [(n, masters.master[id(p)] if masters else p) for n, p in model.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed_tokens" not in n)]
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps,
    )
    total = len(steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, o.warmup_ratio))
    losses, lrs = [], []
    autocast = precision == "bf16" and not master
    t0 = time.perf_counter()
    for sample_ids in steps:
        batch = data.batch(sample_ids, device, model.dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        if masters:
            masters.grads_to_master()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], o.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if masters:
            masters.master_to_model()
        losses.append(float(loss.detach()))  # a host sync per step: fine for a reference
        lrs.append(float(optimizer.param_groups[0]["lr"]))
    return {"loss": losses, "lr": lrs, "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------- reporting
def rel_diff(a: list[float], b: list[float]) -> list[float]:
    """|a - b| / |b| per step (b the reference of the pair)."""
    return [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]


def compare(ours: list[float], ref: list[float], tail: int = 100) -> dict[str, Any]:
    rel = rel_diff(ours, ref)
    last = rel[-tail:]
    return {
        "steps": len(rel),
        "rel_diff": rel,
        "max_rel_diff": max(rel),
        "median_rel_diff_last": statistics.median(last),
        "max_rel_diff_last": max(last),
        "tail": len(last),
        "mean_loss_first10": (statistics.fmean(ours[:10]), statistics.fmean(ref[:10])),
        "mean_loss_last10": (statistics.fmean(ours[-10:]), statistics.fmean(ref[-10:])),
    }


def pair_stats(a: list[float], b: list[float], tail: int = 100) -> dict[str, float]:
    rel = rel_diff(a, b)
    return {"median_rel_diff_last": statistics.median(rel[-tail:]), "max_rel_diff": max(rel),
            "median_rel_diff_first10": statistics.median(rel[:10])}


def noise_floor(
    cfg_fp32: FinetuneConfig, data: ReferenceData, ours: dict[str, Any], ref: dict[str, Any], device: torch.device,
    weights: str,
) -> dict[str, Any]:
    """The other corners of the square on the same samples: ours fp32, the reference fp32 and in the other bf16
    scheme. Each side's bf16-vs-fp32 gap is the rounding noise that side carries by itself; parity between the
    sides in bf16 cannot be expected to be much tighter than the larger of the two."""
    ours32 = run_ours(cfg_fp32)
    if ours32["samples"] != ours["samples"]:
        raise RuntimeError("the fp32 run of ours saw other samples than the bf16 run: the data order is not fixed")
    ref32 = run_reference(cfg_fp32, data, ours["samples"], device, "fp32", weights)
    other = "bf16" if weights == "autocast" else "autocast"
    ref_other = run_reference(cfg_fp32, data, ours["samples"], device, "bf16", other)
    label = {"autocast": "ref bf16-autocast", "bf16": "ref bf16-master"}
    this, that = label[weights], label[other]
    curves = {"ours bf16": ours["loss"], this: ref["loss"], that: ref_other["loss"],
              "ours fp32": ours32["loss"], "ref fp32": ref32["loss"]}
    pairs = [("ours bf16", "ours fp32"), (this, "ref fp32"), (that, "ref fp32"), ("ours fp32", "ref fp32"),
             ("ours bf16", this), ("ours bf16", that), (that, this)]
    return {"curves": curves, "pairs": {f"{a} vs {b}": pair_stats(curves[a], curves[b]) for a, b in pairs},
            "seconds": ours32["seconds"] + ref32["seconds"] + ref_other["seconds"]}


def plot(
    ours: list[float], ref: list[float], rel: list[float], title: str, path: Path,
    floors: dict[str, list[float]] | None = None,
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib); convergence.json has the curves")
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1.4])
    steps = range(1, len(ours) + 1)
    top.plot(steps, ref, label="transformers FuyuForCausalLM (padded, AdamW)", lw=1.2)
    top.plot(steps, ours, label="ours (packed, fused, engine of the run)", lw=1.2, ls="--")
    top.set_ylabel("training loss")
    top.set_title(title)
    top.legend()
    bottom.semilogy(steps, [max(r, 1e-9) for r in rel], lw=1, label="|ours - ref| / ref")
    for name, curve in (floors or {}).items():  # the sides' own bf16-vs-fp32 gaps, for scale
        bottom.semilogy(steps, [max(r, 1e-9) for r in curve], lw=0.8, alpha=0.7, label=name)
    bottom.set_ylabel("relative difference")
    bottom.set_xlabel("optimizer step")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = use_gpu(args)
    precision = resolve_precision(args)
    if args.noise_floor and precision != "bf16":
        raise ValueError("--noise-floor compares bf16 with fp32: use it with bf16 (--precision bf16, or auto on GPU)")
    device = torch.device("cuda" if gpu else "cpu")
    engine = pick_engine(args.engine)
    work = Path(args.work or tempfile.mkdtemp(prefix="convergence-"))
    init = prepare(work, args, precision)
    from otterhd_ray.train.loop import build_data_source

    probe = make_config(work, init, args, engine, 1, precision)
    # one epoch more than epoch 0's count asks for: the packed micro-batch count varies a little per epoch (a
    # run at exactly ceil() epochs stopped at 299 of 300); train.max_steps stops it at --steps
    epochs = math.ceil(args.steps / build_data_source(probe, 0, 1).num_micro_batches(0)) + 1
    cfg = make_config(work, init, args, engine, epochs, precision)
    t0 = time.perf_counter()
    ours = run_ours(cfg)
    if len(ours["loss"]) != args.steps:
        raise RuntimeError(f"ours logged {len(ours['loss'])} steps, not {args.steps}")
    print(f"[{time.perf_counter() - t0:.0f} s] ours done ({ours['seconds']:.0f} s)", flush=True)
    data = ReferenceData(cfg)  # built once: the noise-floor runs reuse its processed samples
    ref = run_reference(cfg, data, ours["samples"], device, precision, args.reference_weights)
    print(f"[{time.perf_counter() - t0:.0f} s] reference done ({ref['seconds']:.0f} s)", flush=True)
    result = summarise(args, gpu, precision, engine, ours, ref, None)
    write_results(result, args, None)  # kept if a time limit kills the noise-floor runs
    if args.noise_floor:
        elapsed = time.perf_counter() - t0
        # the three extra runs cost about one of ours and two references; ours' share includes its warm-up
        # (compilation), which its fp32 run pays again for the new dtype
        expected = ours["seconds"] + 2 * ref["seconds"]
        if args.budget_s and elapsed + expected > args.budget_s:
            print(f"noise floor skipped: {elapsed:.0f} s spent + ~{expected:.0f} s expected > --budget-s "
                  f"{args.budget_s:.0f}", flush=True)
            result["noise_floor_skipped"] = f"~{expected:.0f} s expected after {elapsed:.0f} s"
        else:
            cfg32 = make_config(work, init, args, engine, epochs, "fp32", name="ours-fp32")
            floor = noise_floor(cfg32, data, ours, ref, device, args.reference_weights)
            result = summarise(args, gpu, precision, engine, ours, ref, floor)
            write_results(result, args, floor)
    result["total_s"] = time.perf_counter() - t0
    print_table(result)
    return result


def summarise(
    args: argparse.Namespace, gpu: bool, precision: str, engine: str, ours: dict[str, Any], ref: dict[str, Any],
    floor: dict[str, Any] | None,
) -> dict[str, Any]:
    stats = compare(ours["loss"], ref["loss"])
    lr_gap = max(abs(a - b) for a, b in zip(ours["lr"], ref["lr"], strict=True))
    return {
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "precision": precision, "engine": f"{engine} (ZeRO-2)" if engine == "deepspeed" else engine,
        "reference_weights": args.reference_weights if precision == "bf16" else "fp32",
        "init": "bf16-representable" if precision == "bf16" else "float32",
        "flavour": args.flavour, "layers": args.layers, "max_tokens": args.max_tokens, "long_side": args.long_side,
        "steps": len(ours["loss"]),
        "samples_per_step": statistics.fmean(len(s) for s in ours["samples"]), "lr_max_abs_diff": lr_gap,
        "ours_s": ours["seconds"], "reference_s": ref["seconds"],
        **{k: v for k, v in stats.items() if k != "rel_diff"},
        "noise_floor": None if floor is None else floor["pairs"],
        "noise_floor_s": None if floor is None else floor["seconds"],
        "loss_ours": ours["loss"], "loss_reference": ref["loss"], "rel_diff": stats["rel_diff"],
        "curves": None if floor is None else floor["curves"],
    }


def write_results(result: dict[str, Any], args: argparse.Namespace, floor: dict[str, Any] | None) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "convergence.json").write_text(json.dumps(result, indent=1))
    title = (f"{args.flavour} Fuyu, {result['precision']} (ref: {result['reference_weights']}), {result['engine']}, "
             f"{result['steps']} steps on {result['device']}")
    floors = None
    if floor is not None:
        c = floor["curves"]
        floors = {"ours bf16 vs ours fp32": rel_diff(c["ours bf16"], c["ours fp32"]),
                  "ref bf16 vs ref fp32": rel_diff(result["loss_reference"], c["ref fp32"])}
    ok = plot(result["loss_ours"], result["loss_reference"], result["rel_diff"], title, out / "convergence.png", floors)
    result["png"] = str(out / "convergence.png") if ok else None


def print_table(r: dict[str, Any]) -> None:
    print(f"\nloss parity: ours vs transformers ({r['precision']}, {r['engine']}, {r['device']})")
    print("| steps | samples/step | loss first 10 (ours / ref) | loss last 10 (ours / ref) | max rel diff | "
          f"median rel diff, last {r['tail']} | max rel diff, last {r['tail']} | lr max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    f10, l10 = r["mean_loss_first10"], r["mean_loss_last10"]
    print(f"| {r['steps']} | {r['samples_per_step']:.1f} | {f10[0]:.4f} / {f10[1]:.4f} | {l10[0]:.4f} / {l10[1]:.4f} "
          f"| {r['max_rel_diff']:.2e} | {r['median_rel_diff_last']:.2e} | {r['max_rel_diff_last']:.2e} "
          f"| {r['lr_max_abs_diff']:.1e} |")
    print(f"time: ours {r['ours_s']:.0f} s, reference {r['reference_s']:.0f} s; results in convergence.json")
    if r["noise_floor"]:
        print(f"\nnoise floor: every pair on the same samples (relative loss difference; median over the last "
              f"{r['tail']} steps)")
        print("| pair | median rel diff, last | max rel diff | median rel diff, first 10 |")
        print("|---|---|---|---|")
        for name, p in r["noise_floor"].items():
            print(f"| {name} | {p['median_rel_diff_last']:.2e} | {p['max_rel_diff']:.2e} "
                  f"| {p['median_rel_diff_first10']:.2e} |")
        print(f"noise-floor runs: {r['noise_floor_s']:.0f} s")


if __name__ == "__main__":
    run()
