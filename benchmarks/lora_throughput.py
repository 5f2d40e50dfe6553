"""LoRA fine-tuning throughput on one GPU: ours vs transformers 5.x + peft, and the whole job vs the model alone.

Issue 11, item 6. Fuyu-8B shape (36 layers, random init, bf16), LoRA r=64 / alpha 32 / dropout 0.05 on
query_key_value, dense, dense_h_to_4h, dense_4h_to_h (Otter's recipe without lm_head), on the *mixed* workload
of benchmarks/train_throughput.py (same generated samples for every stack). Every step is forward + backward +
AdamW step over the adapters (the base is frozen).

  peft : transformers `FuyuForCausalLM` (sdpa) + `peft.get_peft_model`, left-padded batches like FuyuProcessor,
         with and without gradient checkpointing, batch sizes --peft-batch-sizes (1,2,4); the best that fits
         --fit-gib (80 GB cards) is the baseline;
  ours : our packed model with the adapters inside the fused layer glue, rows of <= --max-tokens tokens,
         activation checkpointing per --ours-checkpointing (none,selective).
  job  : (--job-runs) the same adapters through the real pipeline on synthetic shards: model-only
         fwd+bwd+step vs `train_loop_per_worker` in process (ds2) vs Ray Train + DeepSpeed with one GPU worker
         (ray2 / ray3), tokens/s from the loop's metrics on the last epoch (benchmarks/finetune_gpu.py's method).

Targets: ours >= 4x peft's best fitting configuration at <= 60 GiB peak; the Ray job within 10 % of model-only.

    python benchmarks/lora_throughput.py --out $OUT                       # one H200 / H100 (defaults: 36 layers)
    python benchmarks/lora_throughput.py --layers 8 --job-runs "" --out /tmp/lora
    python benchmarks/lora_throughput.py --smoke --out /tmp/lora_smoke     # CPU dry run of every part (tests)

Writes `lora_throughput.json` (every number) and `lora_throughput.md` (the tables) under --out (default $OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_throughput as tt  # noqa: E402

from otterhd_ray.models.fuyu import flavour_config, new_model  # noqa: E402
from otterhd_ray.models.fuyu.lora import DEFAULT_TARGETS, LoraSpec, add_lora  # noqa: E402

GIB = 2**30


# ------------------------------------------------------------------------------------------------ peft
def bench_peft(cfg, samples, args, grad_ckpt: bool, batch_size: int, device, dtype) -> dict[str, Any]:
    """transformers + peft LoRA at one batch size: fwd + bwd + AdamW over the adapters."""
    import peft
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.FuyuForCausalLM._from_config(
            transformers.FuyuConfig(**cfg.to_hf_dict()), attn_implementation="sdpa", dtype=dtype
        )
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                           target_modules=list(DEFAULT_TARGETS), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")

    def step(b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    image_patches=b["image_patches"].to(dtype), labels=b["labels"])
        out.loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    batches = tt.hf_batches(samples, batch_size, 0, device)
    try:
        result = tt.run_steps(step, batches, args.warmup, device)
    except Exception as err:  # noqa: BLE001  (OOM at this size is a result, not a crash)
        if not tt.is_oom(err):
            raise
        result = {"error": "out of memory"}
    result.update(batch_size=batch_size, gradient_checkpointing=grad_ckpt,
                  trainable_params=sum(p.numel() for p in trainable))
    return result


# ------------------------------------------------------------------------------------------------ ours
def bench_ours(cfg, samples, args, checkpointing: str, device, dtype) -> dict[str, Any]:
    """Our packed model + adapters in the fused glue: fwd + bwd + AdamW over the adapters."""
    torch.manual_seed(0)
    model = new_model(cfg, dtype=dtype, device=device, attention=args.attention, fused_ops=args.fused_ops,
                      activation_checkpointing=checkpointing, loss_chunk_size=args.loss_chunk_size)
    add_lora(model, LoraSpec(r=args.r, alpha=args.alpha, dropout=args.dropout, targets=DEFAULT_TARGETS))
    model.train()
    backend, ops = model.resolve(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    batches = tt.packed_batches(samples, args.max_tokens, device)

    def step(b):
        loss_sum, num = model.loss(b["packed"])
        (loss_sum / max(num, 1)).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    try:
        result = tt.run_steps(step, batches, args.warmup, device)
    except Exception as err:  # noqa: BLE001
        if not tt.is_oom(err):
            raise
        result = {"error": "out of memory"}
    result.update(attention=backend, fused_ops=ops.mode, checkpointing=checkpointing, max_tokens=args.max_tokens,
                  trainable_params=sum(p.numel() for p in trainable))
    return result


# ------------------------------------------------------------------------------------------------- job
def job_config(work: Path, args: argparse.Namespace, run: str):
    """benchmarks/finetune_gpu.py's config for `run`, with the adapters on and this benchmark's shape."""
    import finetune_gpu

    ns = argparse.Namespace(tiny=args.smoke, layers=args.layers, max_tokens=args.max_tokens,
                            long_sides=args.long_sides, epochs=args.job_epochs, log_every=args.log_every,
                            cpus_per_worker=args.cpus_per_worker)
    cfg = finetune_gpu.make_config(work, ns, run)
    cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = True, args.r, args.alpha, args.dropout
    cfg.optim.lr, cfg.optim.weight_decay = 1e-4, 0.0
    return cfg


def run_model_step(cfg) -> dict[str, Any]:
    """The model alone on the pipeline's last-epoch micro-batches held on the device: fwd + bwd + AdamW step."""
    from otterhd_ray.train.loop import PipelineSource, build_model_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model_for(cfg, device).train()
    # run_steps (train_throughput.py) reads input_ids, real_tokens and samples beside the batch itself
    batches = [
        {"packed": mb.packed.to(device), "input_ids": mb.packed.input_ids, "real_tokens": mb.packed.num_tokens,
         "samples": mb.num_samples}
        for mb in PipelineSource(cfg, 0, 1).iter_epoch(cfg.train.epochs - 1) if not mb.is_filler
    ]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                              fused=device.type == "cuda")

    def step(b):
        loss_sum, num = model.loss(b["packed"])
        (loss_sum / max(num, 1)).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    r = tt.run_steps(step, batches, -1, device)
    return {"tokens_per_s": r["real_tokens_per_s"], "step_s": r["step_time_s"],
            "peak_gib": r["peak_mem_gib"] if r["peak_mem_gib"] == r["peak_mem_gib"] else None}


def bench_job(args: argparse.Namespace, log) -> list[dict[str, Any]]:
    import finetune_gpu

    work = Path(tempfile.mkdtemp(prefix="otterhd-lorabench-"))
    finetune_gpu.prepare_data(work, argparse.Namespace(samples=args.job_samples))
    rows = []
    for run in [r for r in args.job_runs.split(",") if r]:
        cfg = job_config(work, args, "ds2" if run == "model" else run)
        t0 = time.perf_counter()
        try:
            res = run_model_step(cfg) if run == "model" else finetune_gpu.run_job(cfg)
            res["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - one failed run must not lose the others' numbers
            res = {"status": f"failed: {type(err).__name__}: {str(err)[:300]}"}
        res.update(run=run, total_s=time.perf_counter() - t0)
        tt.free(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        log(f"job {run}: {json.dumps(res, default=str)}")
        rows.append(res)
    return rows


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU dry run: debug width, tiny workload, every part")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--peft-batch-sizes", default="1,2,4", help="per checkpointing mode; stops at the first OOM")
    p.add_argument("--peft-checkpointing", default="off,on")
    p.add_argument("--ours-checkpointing", default="none,selective")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--attention", default="auto")
    p.add_argument("--fused-ops", default="auto")
    p.add_argument("--loss-chunk-size", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=-1, help="warm-up batches; -1: one whole pass")
    p.add_argument("--fit-gib", type=float, default=80.0, help="peft baseline: best config under this peak")
    p.add_argument("--target-gib", type=float, default=60.0)
    p.add_argument("--job-runs", default="model,ds2,ray2", help="comma list of model,ds2,ray2,ray3; '' skips")
    p.add_argument("--job-samples", type=int, default=192)
    p.add_argument("--job-epochs", type=int, default=2)
    p.add_argument("--long-sides", default="[448,512,768,1024]")
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=4.0)
    p.add_argument("--out", default=os.environ.get("OUT"), help="results directory (default: $OUT)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out is required (or set OUT)")
    if args.smoke:
        args.layers, args.num_samples, args.r, args.max_tokens, args.peft_batch_sizes = 2, 6, 4, 2048, "1,2"
        args.job_samples, args.long_sides, args.cpus_per_worker, args.warmup = 12, "[240]", 1.0, 1
        args.job_runs = args.job_runs if args.job_runs != "model,ds2,ray2" else "model,ds2"
    return args


def model_level(args, log) -> dict[str, dict]:
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    cfg = flavour_config("debug" if args.smoke else "fuyu-8b").replace(num_layers=args.layers)
    samples = tt.make_workload(cfg, args.num_samples, args.seed)
    results: dict[str, dict] = {}
    for mode in [m for m in args.peft_checkpointing.split(",") if m]:
        for bs in [int(x) for x in args.peft_batch_sizes.split(",")]:
            name = f"peft_gc{mode}_b{bs}"
            results[name] = r = bench_peft(cfg, samples, args, mode == "on", bs, device, dtype)
            tt.free(device)
            log(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'step_ms'}, default=str)}")
            if "error" in r:
                break
    for ckpt in [c for c in args.ours_checkpointing.split(",") if c]:
        name = f"ours_{ckpt}"
        results[name] = r = bench_ours(cfg, samples, args, ckpt, device, dtype)
        tt.free(device)
        log(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'step_ms'}, default=str)}")
    return results


def tables(results: dict[str, dict], jobs: list[dict], args) -> list[str]:
    fits = [r for k, r in results.items() if k.startswith("peft") and "time_s" in r
            and not r["peak_mem_gib"] > args.fit_gib]  # NaN (CPU) counts as fitting
    base = max(fits, key=lambda r: r["real_tokens_per_s"], default=None)
    lines = [f"| stack | batch / row | ckpt | tokens/s | peak GiB | x peft best <= {args.fit_gib:g} GB |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "time_s" not in r:
            lines.append(f"| {name} | {r.get('batch_size', r.get('max_tokens'))} | - | {r.get('error')} | - | - |")
            continue
        ratio = r["real_tokens_per_s"] / base["real_tokens_per_s"] if base else float("nan")
        size = r.get("batch_size", f"<= {r.get('max_tokens')}")
        ckpt = r.get("checkpointing", "on" if r.get("gradient_checkpointing") else "off")
        lines.append(f"| {name} | {size} | {ckpt} | {r['real_tokens_per_s']:,.0f} | {r['peak_mem_gib']:.1f} | "
                     f"{ratio:.2f} |")
    if jobs:
        model = next((j for j in jobs if j["run"] == "model" and j["status"] == "ok"), None)
        lines += ["", "| job run | tokens/s | step s | peak GiB | vs model fwd+bwd+step | status |", "|---|---|---|---|---|---|"]
        for j in jobs:
            ok = j["status"] == "ok"
            rel = f"{100 * (j['tokens_per_s'] / model['tokens_per_s'] - 1):+.1f} %" if ok and model else "-"
            lines.append(f"| {j['run']} | {j['tokens_per_s']:,.0f} | {j['step_s']:.3f} | {j.get('peak_gib') or '-'} | "
                         f"{rel} | {j['status']} |" if ok else f"| {j['run']} | - | - | - | - | {j['status']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else platform.processor()
    versions = {"torch": torch.__version__}
    for name in ("transformers", "peft", "ray", "deepspeed"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    log(f"card {card or 'cpu'}; {versions}; {args.layers} layers; LoRA r={args.r} alpha={args.alpha} "
        f"dropout={args.dropout} on {list(DEFAULT_TARGETS)}")
    results = model_level(args, log)
    jobs = bench_job(args, log) if args.job_runs else []
    text = "\n".join(tables(results, jobs, args))
    log(text)
    meta = {"card": card, "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(sys.argv), "args": vars(args)}
    (out / "lora_throughput.json").write_text(json.dumps(
        {"meta": meta, "results": results, "jobs": jobs, "log": log_lines}, indent=2, default=str))
    (out / "lora_throughput.md").write_text(f"{meta['date']}, {card}, {versions}\n\nCommand: `{meta['command']}`\n\n"
                                            f"{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
