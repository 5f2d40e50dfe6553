"""Fine-tune job throughput on one GPU: model-only vs DeepSpeed in-process vs Ray Train + DeepSpeed (issue 4, item 8).

    python benchmarks/finetune_gpu.py --layers 4 --out docs/finetune_gpu.md
    python benchmarks/finetune_gpu.py --tiny --runs model,ds2,ray2 --out /tmp/ft.md      # CPU dry run

Every run trains on the same synthetic shards (`otterhd data synth`, resolution buckets 448-1024 px) through
the real input pipeline, two epochs, and is measured on the second epoch (the first compiles every packed
shape):

  model : the bare model, fwd + bwd on the pipeline's micro-batches held on the GPU, no optimizer (the model
          benchmark's method);
  ds2   : `train_loop_per_worker` in this process (no Ray), DeepSpeed ZeRO-2, bf16, optimizer step included;
  ray2 / ray3 : `jobs/finetune.py`'s path (`run_finetune`): a TorchTrainer with one GPU worker, ZeRO-2 / ZeRO-3.

Tokens/s of the job runs come from the loop's own metrics (`output_dir/metrics.jsonl`, windows of the second
epoch); "overhead" = 1 - job tokens/s / model-only tokens/s, so it counts the optimizer step, data waits and
Ray / DeepSpeed bookkeeping together. No checkpoint is written (`train.checkpoint_at_end=false`): at Fuyu-8B
width one ZeRO checkpoint is ~40 GB.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otterhd_ray.config import FinetuneConfig, load_finetune_config  # noqa: E402


def make_config(work: Path, args: argparse.Namespace, run: str) -> FinetuneConfig:
    gpu = not args.tiny
    stage = 3 if run.endswith("3") else 2
    out = work / f"out-{run}"
    return load_finetune_config(None, [
        f"data.datasets=[{{name: synth, path: {work / 'data' / 'train'}}}]",
        f"data.tokenizer_path={work / 'tokenizer'}",
        f"data.index_cache_dir={work / 'index'}",
        f"data.max_tokens={args.max_tokens}",
        f"data.buckets.long_sides={args.long_sides}", "data.buckets.native=false",
        f"model.flavour={'debug' if args.tiny else 'fuyu-8b'}",
        *([f"model.num_layers={args.layers}"] if args.layers else []),
        "optim.lr=1e-5", "optim.weight_decay=0.1",
        f"deepspeed.stage={stage}", "deepspeed.torch_adam=true",
        f"train.precision={'bf16' if gpu else 'fp32'}", f"train.epochs={args.epochs}",
        f"train.log_every_steps={args.log_every}", "train.checkpoint_at_end=false",
        f"train.output_dir={out}",
        f"ray.use_gpu={str(gpu).lower()}", f"ray.num_workers={0 if run.startswith('ds') else 1}",
        f"ray.cpus_per_worker={args.cpus_per_worker}", f"ray.storage_path={work / 'ray'}", f"ray.name=bench-{run}",
    ])


def prepare_data(work: Path, args: argparse.Namespace) -> None:
    from otterhd_ray.data.synth import synthesize
    from otterhd_ray.data.tokenizer import build_tiny_tokenizer

    synthesize(work / "data", num_train=args.samples, num_bench=0, seed=0)
    build_tiny_tokenizer(work / "tokenizer")


def run_model_only(cfg: FinetuneConfig) -> dict[str, Any]:
    """The bare model on the pipeline's epoch-1 micro-batches: untimed warm pass, then a timed pass."""
    from otterhd_ray.train.loop import PipelineSource, build_model_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model_for(cfg, device)
    batches = [mb.packed.to(device) for mb in PipelineSource(cfg, 0, 1).iter_epoch(1) if not mb.is_filler]
    tokens = sum(b.num_tokens for b in batches)

    def one_pass() -> None:
        for b in batches:
            loss_sum, n = model.loss(b)
            (loss_sum / max(n, 1)).backward()

    one_pass()
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    one_pass()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / len(batches), "peak_gib": peak,
            "tokens": tokens, "seconds": seconds}


def run_job(cfg: FinetuneConfig) -> dict[str, Any]:
    from otterhd_ray.train.trainer import run_finetune

    t0 = time.perf_counter()
    result = run_finetune(cfg)
    wall = time.perf_counter() - t0
    if getattr(result, "error", None):
        raise RuntimeError(f"run failed: {result.error}")
    history = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    last_epoch = max(h["epoch"] for h in history)
    steady = [h for h in history if h["epoch"] == last_epoch] or history[-1:]
    # drop the first window of the measured epoch: it straddles the epoch boundary (schedule + first reads)
    if len(steady) > 2:
        steady = steady[1:]
    tokens = sum(h["tokens"] for h in steady)
    seconds = sum(h["window_s"] for h in steady)
    steps = steady[-1]["step"] - (steady[0]["step"] - cfg.train.log_every_steps)
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / max(steps, 1),
        "peak_gib": max((h.get("peak_memory_gib") or 0.0) for h in history) or None,
        "data_wait": sum(h["data_wait_fraction"] * h["window_s"] for h in steady) / seconds,
        "loss_first": history[0]["loss"],
        "loss_last": history[-1]["loss"],
        "steps": history[-1]["step"],
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="debug model on CPU (dry run)")
    p.add_argument("--layers", type=int, default=4, help="Fuyu-8B width at this depth (0: the flavour's)")
    p.add_argument("--samples", type=int, default=320)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--long-sides", default="[448,512,768,1024]")
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=4.0)
    # Ray runs first: their GPU work is in a worker process, so this process's CUDA cache is still empty
    p.add_argument("--runs", default="ray2,ray3,model,ds2")
    p.add_argument("--work", default=None, help="working dir (default: a temp dir)")
    p.add_argument("--out", required=True, help="markdown table path")
    args = p.parse_args()
    if args.tiny:
        args.layers, args.samples, args.max_tokens, args.long_sides = 0, 24, 1024, "[240,360]"
        args.cpus_per_worker = 1.0

    work = Path(args.work or tempfile.mkdtemp(prefix="otterhd-ftbench-"))
    prepare_data(work, args)
    rows = []
    for run in args.runs.split(","):
        cfg = make_config(work, args, run)
        t0 = time.perf_counter()
        try:
            res = run_model_only(cfg) if run == "model" else run_job(cfg)
            res["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - one failed stack must not lose the others' numbers
            res = {"status": f"failed: {type(err).__name__}: {str(err)[:200]}"}
        res["run"] = run
        res["total_s"] = time.perf_counter() - t0
        # the in-process runs leave blocks in this process's CUDA cache: give them back before the next run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(json.dumps(res, default=str), flush=True)
        rows.append(res)

    base = next((r["tokens_per_s"] for r in rows if r["run"] == "model" and r["status"] == "ok"), None)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    labels = {"model": "model only: fwd+bwd, no optimizer", "ds2": "DeepSpeed ZeRO-2, in process (no Ray)",
              "ray2": "Ray Train + DeepSpeed ZeRO-2 (1 GPU worker)", "ray3": "Ray Train + DeepSpeed ZeRO-3 (1 GPU worker)"}
    lines = [
        f"Fine-tune job throughput, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {name}, "
        f"torch {torch.__version__}; Fuyu-8B width, {args.layers or 'flavour'} layers, bf16; {args.samples} "
        f"synthetic samples, buckets {args.long_sides}, packed <= {args.max_tokens} tokens, {args.epochs} epochs, "
        "measured on the last.",
        f"Command: `python benchmarks/finetune_gpu.py {' '.join(sys.argv[1:])}`",
        "",
        "| run | tokens/s | step s | peak GiB | data wait | loss first → last | overhead vs model only | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = list(labels)
    for r in sorted(rows, key=lambda r: order.index(r["run"]) if r["run"] in order else len(order)):
        ok = r["status"] == "ok"
        tps = f"{r['tokens_per_s']:,.0f}" if ok else "-"
        over = f"{100 * (1 - r['tokens_per_s'] / base):.1f} %" if ok and base and r["run"] != "model" else "-"
        loss = f"{r['loss_first']:.3f} → {r['loss_last']:.3f}" if ok and "loss_first" in r else "-"
        wait = f"{100 * r['data_wait']:.1f} %" if ok and "data_wait" in r else "-"
        step = f"{r['step_s']:.3f}" if ok and r["run"] != "model" else "-"
        peak = f"{r['peak_gib']:.1f}" if ok and r.get("peak_gib") else "-"
        lines.append(f"| {labels.get(r['run'], r['run'])} | {tps} | {step} | {peak} | {wait} | {loss} | {over} | "
                     f"{r['status']} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
