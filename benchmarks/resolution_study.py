"""Resolution study: does a higher input resolution let a Fuyu model see small objects? (issue 13, item 3)

    python benchmarks/resolution_study.py --out DIR                        # one GPU, one command, ~15 min
    python benchmarks/resolution_study.py --out DIR --state S --call-minutes 8.5
                                   # the same in calls of <= 8.5 min: repeat the same command until it prints
                                   # the table (2-3 calls; docs/benchmarks.md section 11 for the lent H200)
    python benchmarks/resolution_study.py --smoke --out /tmp/rs            # CPU, seconds, numbers meaningless
    python benchmarks/resolution_study.py --data-cost 40 --out DIR         # CPU cost of the scene stream only

Resumable: everything lives in `--state` (default DIR/state): `train.pt` (weights, AdamW, scheduler, step, loss
history, training seconds so far, written to a temporary file and renamed) and `progress.json` (the study's
settings, per-side eval results, one record per call with its wall time). A rerun of the same command resumes:
training first (the `--train-minutes` valve counts training time summed over calls; each call's scene stream is
a new segment, `study-train-<seed>-r<segment>-...`, so resumed training sees fresh scenes), then evaluation side
by side (finished sides are kept). `--call-minutes M` ends a call cleanly once M minutes of the process have
passed (during training: after the current step; during evaluation: before a side that would end past M) and
prints how to continue; keep M a minute under a hard per-command limit for the save. Another study's settings
in the same `--state`, or a damaged / missing state file, is a one-line error naming the file.

OtterHD's claim, tested on a benchmark with exact answers. A `study`-flavour Fuyu (~88 M parameters, the 8B's
layout at 1/5 width, tiny tokenizer) is trained *from scratch* on a stream of fresh synthetic scenes
(`otterhd_ray.data.synth`, the MagnifierBench-like `standard` level: a ~1 %-area target among clutter and
distractors), every frame drawn at 1440-2000 px and resized to a long side drawn from `--train-sides` (mixed
resolution, as OtterHD trains). Half the rows ask the benchmark's multiple-choice question, answered with the
correct option's text; the others are the free-form conversations of the training shards. Length: `--steps auto`
(the default) warms up linearly over `--calibrate-steps` (100), measures the pace, and fixes the cosine schedule
to end within `--train-minutes` (12) of training, at most `--max-steps`: the GPU's speed, not a guess, decides
how far the model trains; the JSON records the steps (`steps`, `steps_mode`).

Evaluation: held-out scenes (another seed), `--items-per-kind` per question kind (colour, shape, count,
position), each resized to every long side of `--eval-sides` (never enlarged: frames are >= 1440 px), greedy
decoding with the model's KV cache, the strict MC parser (an unparsed reply is wrong). Then a no-image control:
the same questions about a grey image at the smallest side, which measures what the model gets from the text and
options alone (the synthetic options carry some prior, e.g. for counts). Prints a table of MC accuracy per kind x
resolution plus the control's row, writes `resolution_study.json` and `resolution_study.png` (the control's
overall accuracy as a dashed line).

Not the production input path: scenes are drawn and preprocessed in DataLoader worker processes and packed in
memory (`buckets.StreamingPacker` + `assemble`), so the GPU is fed without shards or Ray; the model, processor, packer, loss, optimizer
groups and schedule are the project's own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otterhd_ray.models.fuyu import PackedBatch  # noqa: E402

UNPARSED = "unparsed"  # the share of replies that named no option (in the table, not the plot)
MC_PROMPT = "Answer with the text of the correct option."
TEMPLATE = "User: {instruction} Assistant:"  # the evaluation's `otterhd` wrapping, used for training too


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU: debug model, small frames, a few steps")
    p.add_argument("--flavour", default=None, help="default study (smoke: debug)")
    p.add_argument("--level", default="standard")
    p.add_argument("--steps", default=None,
                   help="optimizer steps, or `auto` (the default on a full run; smoke 6): after --calibrate-steps "
                   "of linear warm-up the measured pace fixes the cosine schedule's length so that it ends within "
                   "--train-minutes (at most --max-steps)")
    p.add_argument("--calibrate-steps", type=int, default=None, help="`--steps auto`: warm-up steps whose pace "
                   "fixes the schedule (default 100; smoke 2)")
    p.add_argument("--max-steps", type=int, default=20000, help="`--steps auto`: upper bound")
    p.add_argument("--max-tokens", type=int, default=None, help="packed tokens per step (default 32768)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--train-sides", default=None, help="comma list (default 448,768,1024,1440)")
    p.add_argument("--eval-sides", default=None, help="comma list (default 448,768,1024,1440)")
    p.add_argument("--frame", default=None, help="MIN,MAX long side of the drawn frames (default 1440,2000; "
                   "smoke 240,300); every side should be <= MIN so that resizing never enlarges")
    p.add_argument("--items-per-kind", type=int, default=None, help="held-out items per kind (default 100)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="scene workers")
    p.add_argument("--mc-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="history record (and progress line) every N steps")
    p.add_argument("--train-minutes", type=float, default=12.0,
                   help="training time, summed over calls: what `--steps auto` fills, and a safety valve for a "
                   "fixed --steps (training stops there, reported)")
    p.add_argument("--autocast", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast over float32 weights in training: auto = on a GPU; `on` tries the GPU's "
                        "precision path on a CPU smoke run")
    p.add_argument("--call-minutes", type=float, default=None,
                   help="stop this call cleanly after M minutes of it (state saved; run the same command again "
                   "to continue). Leave ~1 minute below a hard per-command limit for the save. Default: no limit")
    p.add_argument("--state", default=None, help="resumable state directory (default OUT/state)")
    p.add_argument("--data-cost", type=int, default=0, metavar="N",
                   help="only time drawing + preprocessing N training scenes on this CPU and estimate the steps/s "
                   "that --workers sustain; trains nothing")
    p.add_argument("--out", default=os.environ.get("OUT") or "resolution_study_out")
    # deterministic stop hooks for the tests (a call ends as --call-minutes would end it)
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-after-sides", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    smoke = args.smoke
    for key, full, small in (("flavour", "study", "debug"), ("steps", "auto", 6), ("max_tokens", 32768, 2048),
                             ("calibrate_steps", 100, 2),
                             ("train_sides", "448,768,1024,1440", "120,180"), ("frame", "1440,2000", "240,300"),
                             ("eval_sides", "448,768,1024,1440", "120,180"), ("items_per_kind", 100, 2)):
        if getattr(args, key) is None:
            setattr(args, key, small if smoke else full)
    if str(args.steps) != "auto":
        try:
            args.steps = int(args.steps)
        except ValueError:
            raise ValueError(f"--steps must be a number or auto, got {args.steps!r}") from None
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
    elif not 0 < args.calibrate_steps < args.max_steps:
        raise ValueError(f"--steps auto needs 0 < --calibrate-steps ({args.calibrate_steps}) < --max-steps "
                         f"({args.max_steps})")
    args.train_sides = [int(s) for s in str(args.train_sides).split(",")]
    args.eval_sides = [int(s) for s in str(args.eval_sides).split(",")]
    frame = [int(s) for s in str(args.frame).split(",")]
    if len(frame) != 2 or not 0 < frame[0] <= frame[1]:
        raise ValueError(f"--frame must be MIN,MAX with 0 < MIN <= MAX, got {args.frame!r}")
    args.frame = tuple(frame)  # drawn long side: every study side is a downscale
    if args.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {args.log_every}")
    if smoke:
        args.workers = min(args.workers, 2)
    args.state = args.state or str(Path(args.out) / "state")
    return args


# ----------------------------------------------------------------------------------------------- data
def train_scene_key(seed: int, segment: int, worker: int, index: int) -> str:
    """The rng string of a training scene. `segment` counts the training segments (one per call that trains), so
    a resumed call draws fresh scenes instead of replaying the first ones; never `study-eval-...` (held out)."""
    return f"study-train-{seed}-r{segment}-w{worker}-{index}"


class SceneStream(torch.utils.data.IterableDataset):
    """Endless fresh training scenes, processed in the worker: a sample dict per scene (docs/internals.md)."""

    def __init__(self, tokenizer_dir: str, args: argparse.Namespace, segment: int = 0) -> None:
        self.tokenizer_dir, self.args, self.segment = tokenizer_dir, args, segment

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from otterhd_ray.data.processor import FuyuProcessor
        from otterhd_ray.data.synth import get_level
        from otterhd_ray.data.tokenizer import load_tokenizer

        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        processor = FuyuProcessor(load_tokenizer(self.tokenizer_dir), TEMPLATE)
        level, a = get_level(self.args.level), self.args
        for i in range(10**12):
            rng = random.Random(train_scene_key(a.seed, self.segment, worker, i))
            sample = train_sample(rng, level, processor, a)
            sample["sample_index"] = i
            yield sample


def train_sample(rng: random.Random, level: Any, processor: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One training scene drawn at `args.frame`, resized to a long side drawn from `args.train_sides`."""
    from otterhd_ray.data.synth import scene_example

    scene, conversations, _ = scene_example(rng, level, args.frame, args.mc_fraction, MC_PROMPT)
    size = fit_long_side(scene.image.height, scene.image.width, rng.choice(args.train_sides))
    return processor.encode_conversation(scene.image, conversations, size=size)


def fit_long_side(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) with the long side `side`, aspect kept, both rounded to whole 30 px patches (the bucket policy)."""
    from otterhd_ray.config import BucketConfig
    from otterhd_ray.data.buckets import BucketPolicy

    policy = BucketPolicy(BucketConfig(mode="nearest", long_sides=[side], native=False,
                                       native_max_hw=(4096, 4096)))
    return policy.size_for((height, width), 0.0)


def micro_batches(tokenizer_dir: str, args: argparse.Namespace, segment: int = 0) -> Iterator[PackedBatch]:
    from otterhd_ray.data.buckets import StreamingPacker, assemble

    loader = torch.utils.data.DataLoader(
        SceneStream(tokenizer_dir, args, segment), batch_size=None, num_workers=args.workers,
        prefetch_factor=8 if args.workers else None, persistent_workers=bool(args.workers),
    )
    # one group for every size (key None): the study's loss does not care, and packing is denser
    packer = StreamingPacker(args.max_tokens, 0, 512)
    for sample in loader:
        for group in packer.add(None, int(sample["num_tokens"]), sample):
            yield assemble(group)
        if packer.rejected:
            raise ValueError(f"a sample of {int(packer.rejected[0]['num_tokens'])} tokens exceeds --max-tokens")


def data_cost(args: argparse.Namespace, tokenizer_dir: str) -> dict[str, Any]:
    """CPU seconds to draw one training scene and to preprocess it at each train side, on this machine, and the
    steps/s that `args.workers` such processes sustain at `args.max_tokens` (perfect scaling, packing ignored)."""
    from otterhd_ray.data.processor import FuyuProcessor
    from otterhd_ray.data.synth import get_level, scene_example
    from otterhd_ray.data.tokenizer import load_tokenizer

    processor, level = FuyuProcessor(load_tokenizer(tokenizer_dir), TEMPLATE), get_level(args.level)
    draw_s, prep_s, tokens = [], {s: [] for s in args.train_sides}, {s: [] for s in args.train_sides}
    for i in range(args.data_cost):
        rng = random.Random(f"study-cost-{args.seed}-{i}")
        t0 = time.process_time()
        scene, conversations, _ = scene_example(rng, level, args.frame, args.mc_fraction, MC_PROMPT)
        draw_s.append(time.process_time() - t0)
        for side in args.train_sides:
            t0 = time.process_time()
            size = fit_long_side(scene.image.height, scene.image.width, side)
            sample = processor.encode_conversation(scene.image, conversations, size=size)
            prep_s[side].append(time.process_time() - t0)
            tokens[side].append(int(sample["num_tokens"]))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    scene_s = mean(draw_s) + mean([mean(v) for v in prep_s.values()])  # a side drawn uniformly per scene
    scene_tokens = mean([mean(v) for v in tokens.values()])
    step_cpu_s = args.max_tokens / scene_tokens * scene_s
    steps_per_s = args.workers / step_cpu_s
    cost = {"scenes": args.data_cost, "frame_long_side": args.frame, "draw_ms": 1e3 * mean(draw_s),
            "prep_ms": {str(s): 1e3 * mean(v) for s, v in prep_s.items()},
            "tokens": {str(s): mean(v) for s, v in tokens.items()}, "scene_ms": 1e3 * scene_s,
            "tokens_per_scene": scene_tokens, "cpu_s_per_step": step_cpu_s, "workers": args.workers,
            "steps_per_s": steps_per_s, "minutes_for_2400_steps": 2400 / steps_per_s / 60}
    print(f"per scene: draw {cost['draw_ms']:.1f} ms at {args.frame[0]}-{args.frame[1]} px; preprocess "
          + ", ".join(f"{s} px {cost['prep_ms'][str(s)]:.1f} ms / {cost['tokens'][str(s)]:.0f} tokens"
                      for s in args.train_sides))
    print(f"mean {scene_tokens:.0f} tokens and {1e3 * scene_s:.1f} CPU-ms per scene -> {step_cpu_s:.2f} CPU-s per "
          f"step of {args.max_tokens} tokens; {args.workers} workers sustain ~{steps_per_s:.1f} steps/s "
          f"({cost['minutes_for_2400_steps']:.1f} min for 2400 steps; main process and packing not counted)")
    return cost


# ----------------------------------------------------------------------------------------------- state
# The study's identity: a rerun must agree on these to resume (runtime knobs like --workers may change).
STUDY_KEYS = ("smoke", "flavour", "level", "steps", "max_tokens", "lr", "warmup_ratio", "train_sides", "eval_sides",
              "frame", "items_per_kind", "mc_fraction", "seed", "autocast", "calibrate_steps", "max_steps")


@dataclass
class TrainState:
    """Training progress, saved with the weights in one file (so the two never disagree)."""

    step: int = 0
    total_steps: int = 0  # the schedule's length: --steps, or fixed by the calibration under --steps auto (0: not yet)
    segments: int = 0  # training segments started (one per call that trains): the scene stream offset
    train_s: float = 0.0  # training seconds summed over calls: what --train-minutes limits
    tokens: int = 0
    window_loss: float = 0.0  # loss sum / label tokens since the last history record (a stop can fall mid-window)
    window_tokens: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    stopped_early: bool = False  # --train-minutes ran out before --steps


class CallBudget:
    """When this call stops: after --call-minutes of the process, or the test hooks' step / side counts."""

    def __init__(self, args: argparse.Namespace, start: float) -> None:
        self.start = start
        self.seconds = 60 * args.call_minutes if args.call_minutes else None
        self.max_steps, self.max_sides = args.stop_after_steps, args.stop_after_sides

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def stop_training(self, steps_this_call: int) -> bool:
        if self.max_steps is not None and steps_this_call >= self.max_steps:
            return True
        return self.seconds is not None and self.elapsed() >= self.seconds

    def stop_eval(self, sides_this_call: int, estimate_s: float) -> bool:
        """Before a side: stop when it would end past the budget (`estimate_s` from the sides already done)."""
        if self.max_sides is not None and sides_this_call >= self.max_sides:
            return True
        return self.seconds is not None and self.elapsed() + estimate_s >= self.seconds


def _atomic(path: Path, write: Any) -> None:
    """`write(tmp)` then rename over `path`: a call killed mid-save leaves the previous state intact."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class StudyState:
    """The files under --state: `train.pt` (weights, optimizer, scheduler, TrainState) and `progress.json`
    (the study's settings, per-side eval results and seconds, one record per call)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.train_path, self.progress_path = self.dir / "train.pt", self.dir / "progress.json"

    def exists(self) -> bool:
        return self.train_path.exists() or self.progress_path.exists()

    def load_progress(self, config: dict[str, Any]) -> dict[str, Any]:
        for path in (self.progress_path, self.train_path):
            if not path.exists():
                raise ValueError(f"{path}: study state file is missing (delete {self.dir} to start over)")
        try:
            progress = json.loads(self.progress_path.read_text())
            saved = progress["config"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.progress_path}: unreadable study state ({type(err).__name__}: {err}); "
                             f"delete {self.dir} to start over") from None
        for key in STUDY_KEYS:
            if saved.get(key) != config[key]:
                raise ValueError(f"{self.progress_path}: the saved study has {key}={saved.get(key)!r}, this command "
                                 f"{config[key]!r}; rerun the same command or use another --state")
        return progress

    def load_train(self) -> dict[str, Any]:
        try:
            blob = torch.load(self.train_path, map_location="cpu", weights_only=True)
            blob["state"] = TrainState(**blob["state"])
        except Exception as err:  # torch raises many types for a damaged file; all mean the same here
            raise ValueError(f"{self.train_path}: unreadable study state ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); delete {self.dir} to start over") from None
        return blob

    def save_train(self, model: Any, optimizer: Any, scheduler: Any, ts: TrainState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        blob = {"model": model.state_dict(), "state": asdict(ts),
                # after the last step only the weights matter: do not write ~2x their size of AdamW moments
                "optimizer": None if ts.done else optimizer.state_dict(),
                "scheduler": None if ts.done else scheduler.state_dict()}
        _atomic(self.train_path, lambda tmp: torch.save(blob, tmp))

    def save_progress(self, progress: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic(self.progress_path, lambda tmp: tmp.write_text(json.dumps(progress, indent=1)))


# ---------------------------------------------------------------------------------------------- train
def build_optimizer(model: Any, args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    from otterhd_ray.config import OptimConfig
    from otterhd_ray.train.schedule import build_scheduler, param_groups

    optim = OptimConfig(lr=args.lr, weight_decay=0.1, warmup_ratio=args.warmup_ratio, scheduler="cosine")
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, optim.weight_decay)]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    if args.steps == "auto":
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, TimedSchedule(args.calibrate_steps))
    return optimizer, build_scheduler(optimizer, optim.scheduler, args.steps, optim.warmup_ratio)


class TimedSchedule:
    """`--steps auto`'s LR factor: linear warm-up over the calibration steps ((s+1)/(w+1), as the project's
    schedules), then cosine to 0 at `total`, which the calibration sets once it has measured the pace. Plain ints
    only: LambdaLR saves a callable object's attributes in its state_dict."""

    def __init__(self, warmup: int, total: int = 0) -> None:
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup or not self.total:
            return min(1.0, (step + 1) / (self.warmup + 1))
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def fix_schedule(args: argparse.Namespace, ts: TrainState, scheduler: Any, pace: float, elapsed_s: float) -> None:
    """Calibration done: the number of steps that the measured pace fits into what is left of --train-minutes
    (less 8 % for the pace's noise), at least one more step, at most --max-steps."""
    left_s = 60 * args.train_minutes - elapsed_s
    ts.total_steps = max(ts.step + 1, min(args.max_steps, ts.step + int(0.92 * pace * left_s)))
    scheduler.lr_lambdas[0].total = ts.total_steps
    print(f"calibration: {pace:.2f} steps/s after {ts.step} steps -> the schedule ends at step {ts.step} + "
          f"{ts.total_steps - ts.step} = {ts.total_steps} ({left_s / 60:.1f} of --train-minutes {args.train_minutes:g}"
          f" left, 8 % margin, --max-steps {args.max_steps})", flush=True)


def train(model: Any, optimizer: Any, scheduler: Any, args: argparse.Namespace, tokenizer_dir: str,
          device: torch.device, ts: TrainState, budget: CallBudget) -> int:
    """Continue training from `ts` (updated in place) until --steps, the --train-minutes valve or the call's
    budget; returns the number of steps this call ran."""
    bf16 = args.autocast == "on" or (args.autocast == "auto" and device.type == "cuda")
    window_loss = torch.tensor(ts.window_loss, device=device)  # on device: no host sync per step
    base_s, t0, first = ts.train_s, time.perf_counter(), ts.step
    model.train()
    stream = micro_batches(tokenizer_dir, args, segment=ts.segments)
    ts.segments += 1
    paced: list[tuple[int, float]] = []  # (step, time) of this call's steps: the calibration's pace
    step = ts.step
    while step < (ts.total_steps or args.max_steps):
        step += 1
        mb = next(stream).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss_sum, num = model.loss(mb)
        (loss_sum / max(num, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += loss_sum.detach().float()
        ts.window_tokens += int(num)
        ts.tokens += mb.num_tokens
        ts.step = step
        if not ts.total_steps:
            paced.append((step, time.perf_counter()))
            if step >= args.calibrate_steps:
                # pace over the later half of this call's steps: the first ones carry compilation and warm-up
                (s0, t_0), now = paced[len(paced) // 2], time.perf_counter()
                pace = (step - s0) / (now - t_0) if step > s0 else 1.0 / max(now - t0, 1e-9)
                fix_schedule(args, ts, scheduler, pace, base_s + now - t0)
        ts.done = step == ts.total_steps
        if step % args.log_every == 0 or ts.done:
            elapsed = base_s + time.perf_counter() - t0
            record = {"step": step, "loss": float(window_loss) / max(ts.window_tokens, 1), "tokens": ts.tokens,
                      "elapsed_s": elapsed, "tokens_per_s": ts.tokens / elapsed, "lr": scheduler.get_last_lr()[0]}
            ts.history.append(record)
            print(f"step {step}/{ts.total_steps or '?'} loss {record['loss']:.4f} {record['tokens_per_s']:,.0f} tok/s "
                  f"{elapsed:.0f} s", flush=True)
            window_loss.zero_()
            ts.window_tokens = 0
            if elapsed > 60 * args.train_minutes and not ts.done:
                print(f"time limit: stopping at step {step} of {ts.total_steps or '?'} (the schedule did not finish)")
                ts.done = ts.stopped_early = True
        if ts.done or budget.stop_training(step - first):
            break
    stream.close()  # shuts the DataLoader workers down before the save
    ts.window_loss = float(window_loss)
    ts.train_s = base_s + time.perf_counter() - t0
    return ts.step - first


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


def blank_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The held-out items with a uniform grey image of the same size: the no-image control. What a model scores
    on these it gets from the question and options alone (a prior of the synthetic benchmark), not from sight."""
    from PIL import Image

    return [{**it, "image": Image.new("RGB", it["image"].size, (128, 128, 128)), "blank": True} for it in items]


@torch.no_grad()
def evaluate_side(model: Any, tokenizer: Any, items: list[dict[str, Any]], side: int,
                  device: torch.device) -> dict[str, float]:
    """MC accuracy per kind (and "all") of the held-out items resized to long side `side`."""
    from otterhd_ray.data.processor import FuyuProcessor
    from otterhd_ray.data.synth import KINDS, mc_instruction
    from otterhd_ray.data.tokenizer import fuyu_tokens
    from otterhd_ray.eval.scoring import parse_mc_strict

    processor = FuyuProcessor(tokenizer, TEMPLATE)
    stop = [fuyu_tokens(tokenizer).end]
    model.eval()
    correct, unparsed = dict.fromkeys(KINDS, 0), 0
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
            pred = parse_mc_strict(reply, letters)
            unparsed += pred is None
            correct[it["kind"]] += pred == "ABCD"[it["options"].index(it["truth"])]
    n = len(items) // len(KINDS)
    acc = {k: correct[k] / n for k in KINDS}
    acc["all"] = sum(correct.values()) / len(items)
    acc[UNPARSED] = unparsed / len(items)  # a reply naming no option: wrong, but a different failure than a miss
    print(f"eval long side {side}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()), flush=True)
    return acc


# -------------------------------------------------------------------------------------------- reporting
def table(results: dict[int, dict[str, float]], n: int,
          control: tuple[int, dict[str, float]] | None = None) -> str:
    """Markdown: a row per long side, then the no-image control's row (`control`: its side and accuracies)."""
    kinds = list(next(iter(results.values())))  # the kinds, "all", and the share of unparsed replies
    rows = [(str(side), acc) for side, acc in results.items()]
    if control is not None:
        rows.append((f"no image (grey, {control[0]})", control[1]))
    lines = ["| long side | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for label, acc in rows:
        lines.append(f"| {label} | " + " | ".join(f"{100 * acc[k]:.1f} %" for k in kinds) + " |")
    lines.append(f"\nMC accuracy on {n} held-out items per kind (chance 25 %; unparsed replies count as wrong; "
                 f"`{UNPARSED}`: their share of all replies). The no-image row asks the same questions about a "
                 "grey image: what the model gets from the text alone.")
    return "\n".join(lines)


def plot(results: dict[int, dict[str, float]], title: str, path: Path,
         control: dict[str, float] | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return False
    sides = list(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in (k for k in next(iter(results.values())) if k != UNPARSED):
        ax.plot(sides, [100 * results[s][kind] for s in sides], marker="o",
                lw=2.5 if kind == "all" else 1.2, label=kind)
    ax.axhline(25, color="grey", ls=":", lw=1, label="chance")
    if control is not None:
        ax.axhline(100 * control["all"], color="black", ls="--", lw=1, label="all, no image (text prior)")
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


# ------------------------------------------------------------------------------------------------- main
def study_config(args: argparse.Namespace) -> dict[str, Any]:
    return json.loads(json.dumps({k: getattr(args, k) for k in STUDY_KEYS}))  # tuples as JSON gives them back


def restore(state: StudyState, args: argparse.Namespace, model: Any, optimizer: Any,
            scheduler: Any) -> tuple[TrainState, dict[str, Any]]:
    """The saved progress loaded into the fresh model / optimizer / scheduler, or a fresh start."""
    if not state.exists():
        print(f"no study state in {state.dir}: starting a new study", flush=True)
        ts = TrainState(total_steps=0 if args.steps == "auto" else args.steps)
        return ts, {"config": study_config(args), "eval": {}, "eval_s": {}, "calls": []}
    progress = state.load_progress(study_config(args))
    blob = state.load_train()
    model.load_state_dict(blob["model"])
    if blob["optimizer"] is not None:
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
    ts = blob["state"]
    print(f"resuming {state.dir}: step {ts.step}/{ts.total_steps or '?'}{' (training done)' if ts.done else ''}, "
          f"{len(progress['eval'])}/{len(args.eval_sides)} eval sides done, call {len(progress['calls']) + 1}",
          flush=True)
    return ts, progress


def side_estimate(progress: dict[str, Any], side: int) -> float:
    """Seconds the eval of `side` should take, from the largest side done (cost ~ image tokens ~ side^2)."""
    if not progress["eval_s"]:
        return 0.0
    done = max(int(s) for s in progress["eval_s"])
    return progress["eval_s"][str(done)] * (side / done) ** 2


def run_eval(model: Any, tokenizer: Any, args: argparse.Namespace, device: torch.device, progress: dict[str, Any],
             call: dict[str, Any], state: StudyState, budget: CallBudget) -> bool:
    """Evaluate the sides not done yet, saving after each; False when the call's budget ends first."""
    todo = [s for s in args.eval_sides if str(s) not in progress["eval"]]
    items = None
    for side in todo:
        if budget.stop_eval(len(call["eval_sides"]), side_estimate(progress, side)):
            return False
        items = items or held_out(args)
        t0 = time.perf_counter()
        progress["eval"][str(side)] = evaluate_side(model, tokenizer, items, side, device)
        progress["eval_s"][str(side)] = time.perf_counter() - t0
        call["eval_sides"].append(side)
        call["wall_s"] = budget.elapsed()
        state.save_progress(progress)
    if progress.get("control") is None:  # the no-image control, at the cheapest side
        side = min(args.eval_sides)
        if budget.stop_eval(len(call["eval_sides"]), side_estimate(progress, side)):
            return False
        print("no-image control (grey images, the same questions):", flush=True)
        t0 = time.perf_counter()
        progress["control"] = evaluate_side(model, tokenizer, blank_items(items or held_out(args)), side, device)
        progress["control_s"] = time.perf_counter() - t0
        call["control"], call["wall_s"] = True, budget.elapsed()
        state.save_progress(progress)
    return True


def stop_call(args: argparse.Namespace, state: StudyState, progress: dict[str, Any], call: dict[str, Any],
              ts: TrainState, budget: CallBudget) -> dict[str, Any]:
    reason = (f"--call-minutes {args.call_minutes:g}" if budget.seconds is not None
              and budget.elapsed() >= budget.seconds else "stop hook")
    call["stopped"], call["wall_s"] = reason, budget.elapsed()
    state.save_progress(progress)
    print(f"stopped this call after {call['wall_s'] / 60:.1f} min ({reason}) at step {ts.step}/{ts.total_steps or '?'}, "
          f"{len(progress['eval'])}/{len(args.eval_sides)} eval sides done; state in {state.dir}: run the same "
          "command again to continue", flush=True)
    return {"finished": False, "state": str(state.dir), "step": ts.step, "eval_sides_done": list(progress["eval"])}


def finish(args: argparse.Namespace, progress: dict[str, Any], ts: TrainState, num_params: int) -> dict[str, Any]:
    """The final table, JSON and PNG from the saved progress (the same whether one call or several)."""
    results = {side: progress["eval"][str(side)] for side in args.eval_sides}
    train_s, eval_s = ts.train_s, sum(progress["eval_s"].values()) + progress.get("control_s", 0.0)
    device_name = progress["calls"][-1]["device"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"device": device_name, "flavour": args.flavour, "params_m": num_params / 1e6, "level": args.level,
               "steps": ts.total_steps, "steps_mode": "auto" if args.steps == "auto" else "fixed",
               "steps_done": ts.step, "max_tokens": args.max_tokens,
               "train_sides": args.train_sides, "frame_long_side": args.frame, "items_per_kind": args.items_per_kind,
               "train_s": train_s, "eval_s": eval_s, "train_tokens": ts.tokens,
               "accuracy": {str(k): v for k, v in results.items()}, "history": ts.history,
               "stopped_early": ts.stopped_early, "calls": progress["calls"],
               "no_image_control": {"long_side": min(args.eval_sides), "accuracy": progress["control"]}}
    (out / "resolution_study.json").write_text(json.dumps(summary, indent=1))
    text = table(results, args.items_per_kind, (min(args.eval_sides), progress["control"]))
    title = (f"{args.flavour} Fuyu ({num_params / 1e6:.0f} M) from scratch, {ts.step} steps, "
             f"trained at {'/'.join(map(str, args.train_sides))} px, {device_name}")
    plot(results, title, out / "resolution_study.png", progress["control"])
    (out / "resolution_study.md").write_text(text + "\n")
    print("\n" + text)
    wall = sum(c["wall_s"] for c in progress["calls"])
    print(f"train {train_s:.0f} s ({ts.tokens / max(train_s, 1e-9):,.0f} tokens/s), eval {eval_s:.0f} s; "
          f"{len(progress['calls'])} call(s), {wall:.0f} s wall in all; results in {out}")
    summary["finished"] = True
    return summary


def run_study(args: argparse.Namespace, tokenizer: Any, tokenizer_dir: str, budget: CallBudget) -> dict[str, Any]:
    """Train (resuming), evaluate side by side (resuming), report; stops early per `budget`, state saved."""
    from otterhd_ray.models.fuyu.config import config_for_tokenizer, flavour_config
    from otterhd_ray.models.fuyu.model import new_model

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    state = StudyState(args.state)
    torch.manual_seed(args.seed)
    model = new_model(config_for_tokenizer(flavour_config(args.flavour), tokenizer), device=device,
                      attention="auto", fused_ops="auto")
    optimizer, scheduler = build_optimizer(model, args, device)
    ts, progress = restore(state, args, model, optimizer, scheduler)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"{args.flavour} Fuyu, {num_params / 1e6:.1f} M parameters, on {device}; {args.steps} steps of "
          f"{args.max_tokens} tokens; scene workers {args.workers}", flush=True)
    if ts.done and len(progress["eval"]) == len(args.eval_sides) and progress.get("control") is not None:
        print(f"the study in {state.dir} is finished: writing its report again")
        return finish(args, progress, ts, num_params)
    call = {"call": len(progress["calls"]) + 1, "device": torch.cuda.get_device_name() if device.type == "cuda"
            else "cpu", "wall_s": 0.0, "train_s": 0.0, "steps": None, "eval_sides": [], "stopped": None}
    progress["calls"].append(call)
    if not ts.done:
        first, before = ts.step, ts.train_s
        if train(model, optimizer, scheduler, args, tokenizer_dir, device, ts, budget):
            call["steps"] = [first + 1, ts.step]
        call["train_s"] = ts.train_s - before
        state.save_train(model, optimizer, scheduler, ts)
        if not ts.done:
            return stop_call(args, state, progress, call, ts, budget)
    if not run_eval(model, tokenizer, args, device, progress, call, state, budget):
        return stop_call(args, state, progress, call, ts, budget)
    call["wall_s"] = budget.elapsed()
    state.save_progress(progress)
    return finish(args, progress, ts, num_params)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    args = parse_args(argv)
    from otterhd_ray.data.tokenizer import build_tiny_tokenizer

    with tempfile.TemporaryDirectory(prefix="resolution-study-") as work:
        tokenizer_dir = str(Path(work) / "tokenizer")
        tokenizer = build_tiny_tokenizer(tokenizer_dir)  # deterministic: the same on every call
        if args.data_cost:
            cost = data_cost(args, tokenizer_dir)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "data_cost.json").write_text(json.dumps(cost, indent=1))
            return cost
        return run_study(args, tokenizer, tokenizer_dir, CallBudget(args, start))


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # user mistakes and unusable state: one line, no traceback
        sys.exit(f"resolution_study: {err}")
