"""Training throughput: transformers' Fuyu (padded batches) vs ours (packed), on the mixed or the seed workload.

Every stack trains on the *same* generated samples (images of several aspect ratios resized into buckets of
448-1024 px long side, 20-300 text tokens of which a fraction are supervised answer tokens), forward + backward
in bf16 with gradients for every parameter, no optimizer step (the optimizer is the same for all stacks and is
sharded by ZeRO in real runs). Reported per stack: real (non-pad) tokens/s, samples/s, mean step time, peak
memory and useful MFU = the flops the samples need (no padding; logits only at supervised positions) / time /
the bf16 matmul peak measured in the same run.

    python benchmarks/train_throughput.py --layers 8 --out results.json            # on a GPU
    python benchmarks/train_throughput.py --layers 8 --workload seed --stacks ours,hf_sdpa --hf-batch-sizes 8
    python benchmarks/train_throughput.py --layers 8 --stacks ours --profile prof.txt  # per-kernel table
    python benchmarks/train_throughput.py --width debug --num-samples 12 --device cpu  # CPU dry run
    # issue 11 item 7: the previous path and lean_step side by side, host syncs counted, per-kernel tables
    python benchmarks/train_throughput.py --layers 8 --workload seed --stacks ours,ours_lean --sync-check \
        --profile $OUT/prof_seed.txt --out $OUT/seed.json

Stacks: hf_eager, hf_sdpa (transformers, left-padded like FuyuProcessor, each at the best batch size that fits
among --hf-batch-sizes), hf_sdpa_compile (optional: torch.compile(dynamic=True) recompiles for every new padded
shape), ours (packed micro-batches of <= --max-tokens, --attention/--fused-ops/--checkpointing), ours_lean (the
same with the model's `lean_step` switch: sync-free image merge, deferred + compiled LM-head gradient),
ours_nocompile (fused ops off), ours_<checkpointing> (e.g. ours_selective). With several `ours*` stacks,
`--profile P` writes one table per stack (P with the stack name before the suffix).

Workloads: `mixed` (above); `seed` = the OtterHD recipe's `--dynamic_resolution` batches: groups of
--seed-batch (8) samples that share one random square of {448, 512, 768} px, 20-300 text tokens; every stack
runs one group per step (ours: one packed micro-batch per group; transformers: one padded batch per group).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otterhd_ray.models.fuyu import (  # noqa: E402
    IGNORE_INDEX,
    PATCH_SIZE,
    PackedBatch,
    flavour_config,
    new_model,
    normalize_patches,
)
from otterhd_ray.models.fuyu.config import FuyuModelConfig  # noqa: E402

BUCKETS = (448, 512, 768, 1024)
SEED_SQUARES = (448, 512, 768)  # the seed's --dynamic_resolution sizes
ASPECTS = ((9, 16), (3, 4), (1, 1), (4, 3), (16, 9))


@dataclass
class Sample:
    input_ids: np.ndarray  # int64 [T]
    labels: np.ndarray  # int64 [T], -100 where unsupervised (HF convention, unshifted)
    patches: np.ndarray  # uint8 [P, 2700]
    num_image_tokens: int


# --------------------------------------------------------------------------------------------- workload
def make_workload(
    cfg: FuyuModelConfig, num_samples: int, seed: int, max_side: int | None = None,
    aspects: tuple[tuple[int, int], ...] = ASPECTS,
) -> list[Sample]:
    rng = np.random.default_rng(seed)
    newline = cfg.image_token_id + 1  # any non-image id; the layout is what matters for cost
    samples = []
    for _ in range(num_samples):
        long_side = int(rng.choice(BUCKETS)) if max_side is None else max_side
        a, b = aspects[rng.integers(len(aspects))]  # height : width
        h, w = (long_side, long_side * b // a) if a >= b else (long_side * a // b, long_side)
        rows, cols = math.ceil(h / PATCH_SIZE), math.ceil(w / PATCH_SIZE)
        num_text = int(rng.integers(20, 301))
        num_answer = max(1, int(num_text * rng.uniform(0.1, 0.5)))
        image = ([cfg.image_token_id] * cols + [newline]) * rows
        text = rng.integers(3, min(cfg.image_token_id, cfg.vocab_size), num_text).tolist()
        ids = np.array(image + [cfg.bos_token_id] + text, dtype=np.int64)
        labels = np.full_like(ids, IGNORE_INDEX)
        labels[-num_answer:] = ids[-num_answer:]
        patches = rng.integers(0, 256, (rows * cols, cfg.patch_dim), dtype=np.uint8)
        samples.append(Sample(ids, labels, patches, rows * cols))
    return samples


def make_seed_workload(cfg: FuyuModelConfig, num_samples: int, seed: int, group: int) -> list[Sample]:
    """The seed recipe: consecutive groups of `group` samples share one random square image size."""
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    for g in range(0, num_samples, group):
        side = int(rng.choice(SEED_SQUARES))
        n = min(group, num_samples - g)
        samples += make_workload(cfg, n, int(rng.integers(1 << 31)), max_side=side, aspects=((1, 1),))
    return samples


def useful_flops(cfg: FuyuModelConfig, samples: list[Sample]) -> float:
    """Training flops (forward + backward) the samples need: no padding, LM head only where labels are."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    total = 0.0
    for s in samples:
        n = len(s.input_ids)
        per_token = L * 2 * D * (3 * D + D + 2 * F)  # qkv, dense, MLP up + down
        attention = L * 2 * 2 * D * n * (n + 1) / 2  # QK^T and PV, causal half
        head = 2 * D * V * int((s.labels[1:] != IGNORE_INDEX).sum())
        patch = 2 * cfg.patch_dim * D * s.num_image_tokens
        # backward = 2x forward for every matmul, except the patch projection (no input gradient needed)
        total += 3 * (per_token * n + attention + head) + 2 * patch
    return total


def matmul_peak(device: torch.device) -> float:
    """Measured bf16 dense matmul rate (FLOP/s) of this card, 8192^3, median of 20."""
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / float(np.median(times))


# ------------------------------------------------------------------------------------------ batches
def hf_batches(samples: list[Sample], batch_size: int, pad_id: int, device: torch.device) -> list[dict]:
    """Left-padded batches as FuyuProcessor builds them (patches of the batch in placeholder order)."""
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        width = max(len(s.input_ids) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):
            n = len(s.input_ids)
            ids[r, width - n :] = torch.from_numpy(s.input_ids)
            labels[r, width - n :] = torch.from_numpy(s.labels)
            mask[r, width - n :] = 1
        patches = torch.from_numpy(np.concatenate([s.patches for s in chunk]))
        out.append(
            {
                "input_ids": ids.to(device),
                "labels": labels.to(device),
                "attention_mask": mask.to(device),
                "image_patches": normalize_patches(patches.to(device))[None],
                "real_tokens": int(mask.sum()),
                "samples": len(chunk),
            }
        )
    return out


def packed_batches(
    samples: list[Sample], max_tokens: int, device: torch.device, group: int | None = None,
    cfg: FuyuModelConfig | None = None,
) -> list[dict]:
    """Greedy in-order packing into rows of <= max_tokens (the docs/internals.md micro-batch); with `group`,
    exactly `group` consecutive samples per row instead (the seed workload's batches)."""
    groups, current, used = [], [], 0
    for s in samples:
        n = len(s.input_ids)
        if current and (len(current) == group if group else used + n > max_tokens):
            groups.append(current)
            current, used = [], 0
        current.append(s)
        used += n
    if current:
        groups.append(current)
    out = []
    for group in groups:
        lengths = [len(s.input_ids) for s in group]
        targets = []
        for s in group:
            t = np.full_like(s.labels, IGNORE_INDEX)
            t[:-1] = s.labels[1:]
            targets.append(t)
        target_ids = torch.from_numpy(np.concatenate(targets))
        packed = PackedBatch(
            input_ids=torch.from_numpy(np.concatenate([s.input_ids for s in group])),
            target_ids=target_ids,
            position_ids=torch.cat([torch.arange(n) for n in lengths]),
            cu_seqlens=torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32),
            max_seqlen=max(lengths),
            patches=torch.from_numpy(np.concatenate([s.patches for s in group])),
            num_target_tokens=int((target_ids != IGNORE_INDEX).sum()),
        ).to(device)
        # run_steps reads input_ids (for padding), real_tokens and samples, from either stack's batches
        out.append(
            {"packed": packed, "input_ids": packed.input_ids, "real_tokens": sum(lengths), "samples": len(group),
             "useful_flops": useful_flops(cfg, group) if cfg is not None else float("nan")}
        )
    return out


def fixed_cost_fit(step_ms: list[float], step_flops: list[float], peak: float) -> dict:
    """Least-squares `step ms = fixed + flops / (marginal MFU x peak)` over the timed steps: what every micro-batch
    costs regardless of its size (vocabulary-sized gradient work, host syncs, launch latency) vs. the rate of the
    size-dependent part. Issue 11 item 7 measured 8.6 ms fixed and 78 % marginal on the seed workload."""
    if len(step_ms) < 3 or peak != peak or len(set(step_flops)) < 2:
        return {}
    a = np.stack([np.ones(len(step_ms)), np.asarray(step_flops) / 1e12], axis=1)
    (fixed, ms_per_tflop), *_ = np.linalg.lstsq(a, np.asarray(step_ms), rcond=None)
    return {"fixed_ms_per_step": round(float(fixed), 2), "marginal_mfu": round(float(1e3 / (peak / 1e12) / ms_per_tflop), 4)}


# ---------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_steps(step, batches: list[dict], warmup: int, device: torch.device) -> dict:
    """Warm up (`warmup` batches; -1: one whole pass, so every shape is compiled first), then time one pass."""
    for b in batches if warmup < 0 else batches[:warmup]:
        step(b)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    events = []
    t0 = time.perf_counter()
    for b in batches:
        if device.type == "cuda":
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
        step(b)
    if device.type == "cuda":
        events.append(torch.cuda.Event(enable_timing=True))
        events[-1].record()
    sync(device)
    elapsed = time.perf_counter() - t0
    step_ms = [round(a.elapsed_time(b), 1) for a, b in zip(events[:-1], events[1:], strict=True)]
    real = sum(b["real_tokens"] for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    return {
        "time_s": elapsed,
        "steps": len(batches),
        "step_time_s": elapsed / len(batches),
        "real_tokens_per_s": real / elapsed,
        "samples_per_s": sum(b["samples"] for b in batches) / elapsed,
        "padding_fraction": 1 - real / padded,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "step_ms": step_ms,
    }


def profile_steps(step, batches: list[dict], path: str, device: torch.device) -> None:
    """torch profiler over already-warm steps: per-kernel self time table (top 40) written to `path`.

    The wall time of the profiled steps is written beside it: "Self CPU time total" includes the final
    synchronize, so it tracks the device time whether or not the host is the bottleneck; wall time minus
    "Self CUDA time total" is what the device spent idle (plus the profiler's own overhead)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for b in batches:
            step(b)
        sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=80)
    head = f"{len(batches)} steps, {wall_ms:.1f} ms wall (profiled)"
    Path(path).write_text(f"{head}\n{table}\n")
    print(head, table, sep="\n", flush=True)


def count_host_syncs(step, batch: dict, device: torch.device) -> int | None:
    """Device->host synchronisations in one (warm) step, from CUDA's sync debug mode; None off CUDA."""
    import warnings

    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    hits = [w for w in caught if "synchroniz" in str(w.message)]
    for w in hits[:5]:
        print(f"   sync: {str(w.message)[:200]}", flush=True)
    return len(hits)


def profile_path(path: str, spec: str, num_ours: int) -> str:
    """One table per stack when several `ours*` stacks run: prof.txt -> prof.ours_lean.txt."""
    if num_ours <= 1:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{spec.replace('@', '_')}{p.suffix}"))


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_hf(cfg, samples, attn, compile_, batch_sizes, warmup, device, dtype, log) -> dict:
    import transformers

    hf_cfg = transformers.FuyuConfig(**cfg.to_hf_dict())
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.FuyuForCausalLM._from_config(hf_cfg, attn_implementation=attn, dtype=dtype)
    model.train()
    fwd = torch.compile(model, dynamic=True) if compile_ else model

    def step(b):
        out = fwd(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], image_patches=b["image_patches"].to(dtype),
            labels=b["labels"],
        )
        out.loss.backward()
        for p in model.parameters():
            p.grad = None

    best, tried = None, {}
    for bs in batch_sizes:
        batches = hf_batches(samples, bs, 0, device)
        try:
            result = run_steps(step, batches, warmup, device)
        except Exception as err:  # noqa: BLE001  (OOM at this size is a result, not a crash)
            if not is_oom(err):
                raise
            tried[bs] = "out of memory"
            log(f"  batch {bs}: out of memory")
            del batches
            for p in model.parameters():
                p.grad = None
            free(device)
            break
        result["batch_size"] = bs
        tried[bs] = round(result["real_tokens_per_s"])
        log(f"  batch {bs}: {result['real_tokens_per_s']:.0f} real tokens/s, peak {result['peak_mem_gib']:.1f} GiB")
        if best is None or result["real_tokens_per_s"] > best["real_tokens_per_s"]:
            best = result
        del batches
        free(device)
    if best is None:
        return {"error": "out of memory at every batch size", "tried": tried}
    best["tried"] = tried
    return best


def bench_ours(
    cfg, samples, args, checkpointing, warmup, device, dtype, max_tokens, lean=False, profile=None
) -> dict:
    torch.manual_seed(0)
    model = new_model(
        cfg, dtype=dtype, device=device, attention=args.attention, fused_ops=args.fused_ops,
        activation_checkpointing=checkpointing, loss_chunk_size=args.loss_chunk_size,
        selective_every=args.selective_every, lean_step=lean,
    ).train()
    backend, ops = model.resolve(device)
    batches = packed_batches(
        samples, max_tokens, device, args.seed_batch if args.workload == "seed" else None, cfg=cfg
    )

    def step(b):
        loss_sum, num = model.loss(b["packed"])
        (loss_sum / max(num, 1)).backward()
        for p in model.parameters():
            p.grad = None

    try:
        result = run_steps(step, batches, warmup, device)
        if args.sync_check:
            result["host_syncs_per_step"] = count_host_syncs(step, batches[0], device)
        if profile:
            profile_steps(step, batches[: args.profile_steps], profile, device)
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        result = {"error": "out of memory"}
    if "step_ms" in result:
        result["step_flops"] = [b["useful_flops"] for b in batches]
    result.update(
        attention=backend, fused_ops=ops.mode, checkpointing=checkpointing, max_tokens=max_tokens, lean_step=lean
    )
    if checkpointing == "selective":
        result["selective_every"] = args.selective_every
    return result


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", default="fuyu-8b", choices=["fuyu-8b", "debug"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stacks", default="hf_eager,hf_sdpa,ours,ours_nocompile")
    p.add_argument("--hf-batch-sizes", default="2,4,8", help="tried in order; stops at the first OOM")
    p.add_argument("--eager-batch-sizes", default="1,2,4")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--attention", default="auto")
    p.add_argument("--fused-ops", default="auto")
    p.add_argument("--checkpointing", default="none")
    p.add_argument("--selective-every", type=int, default=2, help="selective: every N-th layer; 0: op-level")
    p.add_argument("--loss-chunk-size", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=-1, help="warm-up batches; -1: one whole pass (default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--workload", default="mixed", choices=["mixed", "seed"])
    p.add_argument("--seed-batch", type=int, default=8, help="seed workload: samples per step (one square)")
    p.add_argument("--profile", default=None, help="ours: write a torch-profiler per-kernel table here")
    p.add_argument("--profile-steps", type=int, default=6)
    p.add_argument("--sync-check", action="store_true", help="ours: count host syncs in one step (CUDA)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = flavour_config(args.width).replace(num_layers=args.layers)
    if args.workload == "seed":
        samples = make_seed_workload(cfg, args.num_samples, args.seed, args.seed_batch)
        args.hf_batch_sizes = args.eager_batch_sizes = str(args.seed_batch)  # one square per padded batch
    else:
        samples = make_workload(cfg, args.num_samples, args.seed)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    flops = useful_flops(cfg, samples)
    peak = matmul_peak(device)
    real_tokens = sum(len(s.input_ids) for s in samples)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"card {card}; torch {torch.__version__}; width {args.width}, {args.layers} layers; {args.workload} workload; "
        f"{len(samples)} samples, {real_tokens} real tokens; {flops / real_tokens / 1e9:.2f} useful GFLOP/token; "
        f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    results: dict[str, dict] = {}
    specs = args.stacks.split(",")
    num_ours = sum(s.startswith("ours") for s in specs)
    for spec in specs:
        # "ours@32768": the same stack with another packing budget
        stack, _, tokens = spec.partition("@")
        max_tokens = int(tokens) if tokens else args.max_tokens
        log(f"== {spec}")
        t0 = time.perf_counter()
        prof = profile_path(args.profile, spec, num_ours) if args.profile else None
        if stack == "hf_eager":
            bs = [int(x) for x in args.eager_batch_sizes.split(",")]
            r = bench_hf(cfg, samples, "eager", False, bs, args.warmup, device, dtype, log)
        elif stack in ("hf_sdpa", "hf_sdpa_compile"):
            bs = [int(x) for x in args.hf_batch_sizes.split(",")]
            r = bench_hf(cfg, samples, "sdpa", stack.endswith("compile"), bs, args.warmup, device, dtype, log)
        elif stack in ("ours", "ours_lean"):
            r = bench_ours(
                cfg, samples, args, args.checkpointing, args.warmup, device, dtype, max_tokens,
                lean=stack == "ours_lean", profile=prof,
            )
        elif stack == "ours_nocompile":
            saved = args.fused_ops
            args.fused_ops = "none"
            r = bench_ours(cfg, samples, args, args.checkpointing, args.warmup, device, dtype, max_tokens, profile=prof)
            args.fused_ops = saved
        elif stack.startswith("ours_"):  # ours_<checkpointing>, e.g. ours_selective / ours_full
            r = bench_ours(cfg, samples, args, stack[5:], args.warmup, device, dtype, max_tokens, profile=prof)
        else:
            raise SystemExit(f"unknown stack {stack!r}")
        free(device)  # the stack's model went out of scope with its function
        r["wall_s_incl_warmup_and_compile"] = time.perf_counter() - t0
        if "time_s" in r:
            r["useful_mfu"] = flops / r["time_s"] / peak if peak == peak else float("nan")
        if r.get("step_flops"):
            r.update(fixed_cost_fit(r["step_ms"], r.pop("step_flops"), peak))
        results[spec] = r
        log(f"   {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != 'step_ms'})}")
        log(f"   step ms: {r.get('step_ms')}")

    base = max((r.get("real_tokens_per_s", 0) for k, r in results.items() if k.startswith("hf_")), default=0)
    header = f"{'stack':<16}{'batch':>8}{'tokens/s':>11}{'samples/s':>11}{'step s':>9}{'peak GiB':>10}{'pad %':>7}{'MFU %':>7}{'x HF':>7}{'fixed ms':>10}{'marg %':>8}"
    log(header)
    for name, r in results.items():
        if "time_s" not in r:
            log(f"{name:<16}{r.get('error', 'failed')}")
            continue
        batch = r.get("batch_size", f"<={r.get('max_tokens', '')}")
        ratio = r["real_tokens_per_s"] / base if base else float("nan")
        log(f"{name:<16}{batch!s:>8}{r['real_tokens_per_s']:>11.0f}{r['samples_per_s']:>11.2f}{r['step_time_s']:>9.3f}"
            f"{r['peak_mem_gib']:>10.1f}{100 * r['padding_fraction']:>7.1f}{100 * r.get('useful_mfu', float('nan')):>7.1f}"
            f"{ratio:>7.2f}{r.get('fixed_ms_per_step', float('nan')):>10.1f}{100 * r.get('marginal_mfu', float('nan')):>8.1f}")
    if args.out:
        meta = {"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": " ".join(sys.argv), "layers": args.layers, "width": args.width, "workload": args.workload,
                "num_samples": len(samples), "real_tokens": real_tokens, "useful_flops": flops, "matmul_peak": peak}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results, "log": lines}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
