"""Resolution study: does a higher input resolution let a Fuyu model see small objects? (issue 13, item 3)

    python benchmarks/resolution_study.py --out docs/resolution_study     # one GPU, ~15-25 min
    python benchmarks/resolution_study.py --smoke --out /tmp/rs            # CPU, minutes, numbers meaningless

OtterHD's claim, tested on a benchmark with exact answers. A `study`-flavour Fuyu (~88 M parameters, the 8B's
layout at 1/5 width, tiny tokenizer) is trained *from scratch* on a stream of fresh synthetic scenes
(`otterhd_ray.data.synth`, the MagnifierBench-like `standard` level: a ~1 %-area target among clutter and
distractors), every frame drawn at 1440-2000 px and resized to a long side drawn from `--train-sides` (mixed
resolution, as OtterHD trains). Half the rows ask the benchmark's multiple-choice question, answered with the
correct option's text; the others are the free-form conversations of the training shards.

Evaluation: held-out scenes (another seed), `--items-per-kind` per question kind (colour, shape, count,
position), each resized to every long side of `--eval-sides` (never enlarged: frames are >= 1440 px), greedy
decoding with the model's KV cache, the strict MC parser (an unparsed reply is wrong). Prints a table of MC
accuracy per kind x resolution, writes `resolution_study.json` and `resolution_study.png`.

Not the production input path: scenes are drawn and preprocessed in DataLoader worker processes and packed in
memory (`buckets.StreamingPacker` + `assemble`), so the GPU is fed without shards or Ray; the model, processor, packer, loss, optimizer
groups and schedule are the project's own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otterhd_ray.models.fuyu import PackedBatch  # noqa: E402

MC_PROMPT = "Answer with the text of the correct option."
TEMPLATE = "User: {instruction} Assistant:"  # the evaluation's `otterhd` wrapping, used for training too


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU: debug model, small frames, a few steps")
    p.add_argument("--flavour", default=None, help="default study (smoke: debug)")
    p.add_argument("--level", default="standard")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2400; smoke 6)")
    p.add_argument("--max-tokens", type=int, default=None, help="packed tokens per step (default 32768)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--train-sides", default=None, help="comma list (default 448,768,1024,1440)")
    p.add_argument("--eval-sides", default=None, help="comma list (default 448,768,1024,1440)")
    p.add_argument("--items-per-kind", type=int, default=None, help="held-out items per kind (default 100)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="scene workers")
    p.add_argument("--mc-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-minutes", type=float, default=18.0,
                   help="safety valve: stop training after this long even before --steps (reported)")
    p.add_argument("--out", default=os.environ.get("OUT") or "resolution_study_out")
    args = p.parse_args(argv)
    smoke = args.smoke
    for key, full, small in (("flavour", "study", "debug"), ("steps", 2400, 6), ("max_tokens", 32768, 2048),
                             ("train_sides", "448,768,1024,1440", "120,180"),
                             ("eval_sides", "448,768,1024,1440", "120,180"), ("items_per_kind", 100, 2)):
        if getattr(args, key) is None:
            setattr(args, key, small if smoke else full)
    args.train_sides = [int(s) for s in str(args.train_sides).split(",")]
    args.eval_sides = [int(s) for s in str(args.eval_sides).split(",")]
    args.frame = (240, 300) if smoke else (1440, 2000)  # drawn long side: every study side is a downscale
    if smoke:
        args.workers = min(args.workers, 2)
    return args


# ----------------------------------------------------------------------------------------------- data
class SceneStream(torch.utils.data.IterableDataset):
    """Endless fresh training scenes, processed in the worker: a sample dict per scene (docs/internals.md)."""

    def __init__(self, tokenizer_dir: str, args: argparse.Namespace) -> None:
        self.tokenizer_dir, self.args = tokenizer_dir, args

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from otterhd_ray.data.processor import FuyuProcessor
        from otterhd_ray.data.synth import get_level, scene_example
        from otterhd_ray.data.tokenizer import load_tokenizer

        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        processor = FuyuProcessor(load_tokenizer(self.tokenizer_dir), TEMPLATE)
        level, a = get_level(self.args.level), self.args
        for i in range(10**12):
            rng = random.Random(f"study-train-{a.seed}-{worker}-{i}")
            scene, conversations, _ = scene_example(rng, level, a.frame, a.mc_fraction, MC_PROMPT)
            size = fit_long_side(scene.image.height, scene.image.width, rng.choice(a.train_sides))
            sample = processor.encode_conversation(scene.image, conversations, size=size)
            sample["sample_index"] = i
            yield sample


def fit_long_side(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) with the long side `side`, aspect kept, both rounded to whole 30 px patches (the bucket policy)."""
    from otterhd_ray.config import BucketConfig
    from otterhd_ray.data.buckets import BucketPolicy

    policy = BucketPolicy(BucketConfig(mode="nearest", long_sides=[side], native=False,
                                       native_max_hw=(4096, 4096)))
    return policy.size_for((height, width), 0.0)


def micro_batches(tokenizer_dir: str, args: argparse.Namespace) -> Iterator[PackedBatch]:
    from otterhd_ray.data.buckets import StreamingPacker, assemble

    loader = torch.utils.data.DataLoader(
        SceneStream(tokenizer_dir, args), batch_size=None, num_workers=args.workers,
        prefetch_factor=8 if args.workers else None, persistent_workers=bool(args.workers),
    )
    # one group for every size (key None): the study's loss does not care, and packing is denser
    packer = StreamingPacker(args.max_tokens, 0, 512)
    for sample in loader:
        for group in packer.add(None, int(sample["num_tokens"]), sample):
            yield assemble(group)
        if packer.rejected:
            raise ValueError(f"a sample of {int(packer.rejected[0]['num_tokens'])} tokens exceeds --max-tokens")


# ---------------------------------------------------------------------------------------------- train
def train(model: Any, args: argparse.Namespace, tokenizer_dir: str, device: torch.device) -> list[dict[str, Any]]:
    from otterhd_ray.config import OptimConfig
    from otterhd_ray.train.schedule import build_scheduler, param_groups

    optim = OptimConfig(lr=args.lr, weight_decay=0.1, warmup_ratio=args.warmup_ratio, scheduler="cosine")
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, optim.weight_decay)]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, optim.scheduler, args.steps, optim.warmup_ratio)
    bf16 = device.type == "cuda"
    history, window_loss, window_tok, tokens, t0 = [], torch.zeros((), device=device), 0, 0, time.perf_counter()
    model.train()
    stream = micro_batches(tokenizer_dir, args)
    for step in range(1, args.steps + 1):
        mb = next(stream).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss_sum, num = model.loss(mb)
        (loss_sum / max(num, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += loss_sum.detach().float()
        window_tok += num
        tokens += mb.num_tokens
        if step % 50 == 0 or step == args.steps:
            elapsed = time.perf_counter() - t0
            record = {"step": step, "loss": float(window_loss) / max(window_tok, 1), "tokens": tokens,
                      "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed, "lr": scheduler.get_last_lr()[0]}
            history.append(record)
            print(f"step {step}/{args.steps} loss {record['loss']:.4f} {record['tokens_per_s']:,.0f} tok/s "
                  f"{elapsed:.0f} s", flush=True)
            window_loss.zero_()
            window_tok = 0
            if elapsed > 60 * args.train_minutes and step < args.steps:
                print(f"time limit: stopping at step {step} of {args.steps} (the schedule did not finish)")
                break
    return history


# ----------------------------------------------------------------------------------------------- eval
def held_out(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`items_per_kind` scenes of each kind, another seed than training (its streams use `study-train-...`)."""
    from otterhd_ray.data.synth import KINDS, get_level, scene_example

    level, items = get_level(args.level), []
    for kind in KINDS:
        for i in range(args.items_per_kind):
            rng = random.Random(f"study-eval-{args.seed}-{kind}-{i}")
            scene, _, (question, options, truth) = scene_example(rng, level, args.frame, kind=kind)
            items.append({"kind": kind, "image": scene.image, "question": question, "options": options,
                          "truth": truth})
    return items


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, items: list[dict[str, Any]], sides: list[int],
             device: torch.device) -> dict[int, dict[str, float]]:
    from otterhd_ray.data.processor import FuyuProcessor
    from otterhd_ray.data.synth import KINDS, mc_instruction
    from otterhd_ray.data.tokenizer import fuyu_tokens
    from otterhd_ray.eval.scoring import parse_mc_strict

    processor = FuyuProcessor(tokenizer, TEMPLATE)
    stop = [fuyu_tokens(tokenizer).end]
    model.eval()
    results: dict[int, dict[str, float]] = {}
    for side in sides:
        correct = dict.fromkeys(KINDS, 0)
        for start in range(0, len(items), 32):
            chunk = items[start : start + 32]
            prompts = []
            for it in chunk:
                text = TEMPLATE.replace("{instruction}", f"{MC_PROMPT} {mc_instruction(it['question'], it['options'])}")
                size = fit_long_side(it["image"].height, it["image"].width, side)
                s = processor.encode_prompt(it["image"], text, size=size)
                prompts.append((torch.from_numpy(s["input_ids"]).long().to(device),
                                torch.from_numpy(s["patches"]).to(device)))
            outs = model.generate(prompts, max_new_tokens=8, stop_ids=stop)  # fp32 weights: 88 M is cheap
            for it, new_ids in zip(chunk, outs, strict=True):
                reply = tokenizer.decode([t for t in new_ids if t not in stop], skip_special_tokens=True).strip()
                letters = {"ABCD"[k]: o for k, o in enumerate(it["options"])}
                correct[it["kind"]] += parse_mc_strict(reply, letters) == "ABCD"[it["options"].index(it["truth"])]
        n = len(items) // len(KINDS)
        results[side] = {k: correct[k] / n for k in KINDS}
        results[side]["all"] = sum(correct.values()) / len(items)
        print(f"eval long side {side}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in results[side].items()),
              flush=True)
    return results


# -------------------------------------------------------------------------------------------- reporting
def table(results: dict[int, dict[str, float]], n: int) -> str:
    kinds = list(next(iter(results.values())))
    lines = ["| long side | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for side, acc in results.items():
        lines.append(f"| {side} | " + " | ".join(f"{100 * acc[k]:.1f} %" for k in kinds) + " |")
    lines.append(f"\nMC accuracy on {n} held-out items per kind (chance 25 %; unparsed replies count as wrong).")
    return "\n".join(lines)


def plot(results: dict[int, dict[str, float]], title: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return False
    sides = list(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in next(iter(results.values())):
        ax.plot(sides, [100 * results[s][kind] for s in sides], marker="o",
                lw=2.5 if kind == "all" else 1.2, label=kind)
    ax.axhline(25, color="grey", ls=":", lw=1, label="chance")
    ax.set_xticks(sides)
    ax.set_xlabel("evaluation long side (px)")
    ax.set_ylabel("held-out MC accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from otterhd_ray.data.tokenizer import build_tiny_tokenizer
    from otterhd_ray.models.fuyu.config import config_for_tokenizer, flavour_config
    from otterhd_ray.models.fuyu.model import new_model

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    work = Path(tempfile.mkdtemp(prefix="resolution-study-"))
    tokenizer = build_tiny_tokenizer(work / "tokenizer")
    torch.manual_seed(args.seed)
    model_cfg = config_for_tokenizer(flavour_config(args.flavour), tokenizer)
    model = new_model(model_cfg, device=device, attention="auto", fused_ops="auto")
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{args.flavour} Fuyu, {num_params / 1e6:.1f} M parameters, on {device}; {args.steps} steps of "
          f"{args.max_tokens} tokens; scene workers {args.workers}", flush=True)
    t0 = time.perf_counter()
    history = train(model, args, str(work / "tokenizer"), device)
    train_s = time.perf_counter() - t0
    items = held_out(args)
    t1 = time.perf_counter()
    results = evaluate(model, tokenizer, items, args.eval_sides, device)
    eval_s = time.perf_counter() - t1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    summary = {"device": device_name, "flavour": args.flavour, "params_m": num_params / 1e6, "level": args.level,
               "steps": args.steps, "steps_done": history[-1]["step"] if history else 0, "max_tokens": args.max_tokens, "train_sides": args.train_sides,
               "frame_long_side": args.frame, "items_per_kind": args.items_per_kind, "train_s": train_s,
               "eval_s": eval_s, "train_tokens": history[-1]["tokens"] if history else 0,
               "accuracy": {str(k): v for k, v in results.items()}, "history": history}
    (out / "resolution_study.json").write_text(json.dumps(summary, indent=1))
    text = table(results, args.items_per_kind)
    title = (f"{args.flavour} Fuyu ({num_params / 1e6:.0f} M) from scratch, {args.steps} steps, "
             f"trained at {'/'.join(map(str, args.train_sides))} px, {device_name}")
    plot(results, title, out / "resolution_study.png")
    (out / "resolution_study.md").write_text(text + "\n")
    print("\n" + text)
    print(f"train {train_s:.0f} s ({summary['train_tokens'] / max(train_s, 1e-9):,.0f} tokens/s), eval {eval_s:.0f} s;"
          f" results in {out}")
    return summary


if __name__ == "__main__":
    main()
