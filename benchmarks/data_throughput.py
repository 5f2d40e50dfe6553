"""Input-pipeline benchmark: per-core preprocessing throughput and packing efficiency. Prints markdown tables.

    python benchmarks/data_throughput.py [--images 48] [--passes 3] [--pack-rows 800] [--ray]

1. **Per core**: decode -> bucket -> resize -> patchify -> tokenize of 1024-px JPEGs (long side 1024, aspect
   9:16 ... 16:9) in one process pinned to one CPU, no Ray: the cost one core pays per sample. Two kinds of
   JPEG: synth's scenes (smooth, like the training data) and the same scenes with pixel noise (high entropy,
   closer to photos, slower to decode). Policies: the default random buckets with and without JPEG draft
   decoding, OtterHD's squares (`otterhd` mode), and the worst case (every image kept at 1020 px, where draft cannot help).
   Stage times are CPU ms per sample (process CPU time, so other load on a shared machine does not count;
   `--wall` for wall time); "tokenize" is the processor's encode minus its resize and patchify.
2. **Whole pipeline**, wall clock: `build_train_iterator` (one rank) over a shard of those JPEGs, in-process, and
   with `--ray` through Ray Data on a local Ray with every CPU of this machine (samples/s / CPUs = per core).
3. **Packing**: `schedule_epoch` on a synthetic mix (`otterhd data synth`) — real tokens / (micro-batches x
   max_tokens) for several budgets, bucket modes and packer buffers.
4. **Convert** (`--parts convert`): `otterhd data convert --format llava` of a generated LLaVA JSON array
   (`--convert-records`, default 50k and 200k; 1 in 16 text-only) whose images are local JPEG files (a pool of
   `--convert-pool` distinct 448x336 files, referenced in turn), one process each, no Ray: records/s by wall
   clock and per CPU-second, and the child's peak RSS (targets: >= 2,000 samples/s, <= 1 GB at any size).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otterhd_ray.config import BucketConfig, DataConfig  # noqa: E402
from otterhd_ray.data.buckets import BucketPolicy, epoch_uniforms  # noqa: E402
from otterhd_ray.data.images import decode_image  # noqa: E402
from otterhd_ray.data.processor import FuyuProcessor, patchify, resize_image  # noqa: E402
from otterhd_ray.data.synth import draw_scene  # noqa: E402
from otterhd_ray.data.tokenizer import build_tiny_tokenizer, load_tokenizer  # noqa: E402
from otterhd_ray.models.fuyu import PATCH_SIZE  # noqa: E402

CONV = [
    {"role": "user", "text": "What color is the small triangle in the top left of the image?"},
    {"role": "assistant", "text": "The small triangle in the top left is red."},
]
MAX_PIXELS = 89_478_485
# CPU time of this process, not wall time: the figure is "cost per core", and on a shared machine wall time
# also counts the time other processes held the core. (--wall switches back to wall time.)
clock = time.process_time


def make_jpegs(n: int, noisy: bool, seed: int = 0) -> list[bytes]:
    out = []
    for i in range(n):
        rng = random.Random(f"bench-{seed}-{i}")
        image = draw_scene(rng, "colour", long_min=1024, long_max=1024).image
        if noisy:
            arr = np.asarray(image, dtype=np.int16)
            noise = np.random.default_rng(i).normal(0, 12, arr.shape).astype(np.int16)
            image = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def per_core(jpegs: list[bytes], proc: FuyuProcessor, policy: BucketPolicy | None, draft: bool,
             passes: int) -> dict[str, float]:
    """Per-sample seconds of each stage (policy None: keep every image at 1020 px long side)."""
    t = {"decode": 0.0, "resize": 0.0, "patchify": 0.0, "encode": 0.0}
    tokens = 0
    n = 0
    for p in range(passes):
        draws = epoch_uniforms(0, p, len(jpegs))  # pass p draws as the pipeline's epoch p would
        for i, data in enumerate(jpegs):
            from otterhd_ray.data.images import image_size

            h, w = image_size(data, MAX_PIXELS)
            if policy is None:
                s = 1020 / max(h, w)
                size = (round(h * s / PATCH_SIZE) * PATCH_SIZE, round(w * s / PATCH_SIZE) * PATCH_SIZE)
            else:
                size = policy.size_for((h, w), float(draws[i]))
            t0 = clock()
            image = decode_image(data, MAX_PIXELS, draft_target=size if draft else None)
            t1 = clock()
            resized = resize_image(image, size)
            t2 = clock()
            patchify(np.asarray(resized, dtype=np.uint8))
            t3 = clock()
            sample = proc.encode_conversation(image, CONV, size=size)  # the real call: resize+patchify+tokens
            t4 = clock()
            t["decode"] += t1 - t0
            t["resize"] += t2 - t1
            t["patchify"] += t3 - t2
            t["encode"] += t4 - t3
            tokens += int(sample["num_tokens"])
            n += 1
    out = {k: v / n for k, v in t.items()}
    out["tokenize"] = max(0.0, out["encode"] - out["resize"] - out["patchify"])
    out["total"] = out["decode"] + out["encode"]
    out["tokens"] = tokens / n
    return out


def pipeline_throughput(
    jpegs: list[bytes], num_samples: int, tok_dir: str, work: Path, use_ray: bool
) -> list[tuple[int, float, int, float | None]]:
    """Wall-clock samples/s of the whole pipeline (`build_train_iterator`, one rank) for epochs 0, 1, 2, in-process
    or through Ray Data on every CPU. Epoch 0 is cold (index build, worker start-up and imports); workers stay up
    across epochs in training, so epoch 2 is the steady state. Returns (epoch, samples/s, CPUs, samples per
    CPU-second or None) per epoch."""
    from otterhd_ray.data.pipeline import build_train_iterator
    from otterhd_ray.data.shards import ShardWriter

    shards = work / "shards"
    if not shards.exists():
        with ShardWriter(shards, rows_per_group=16, overwrite=True) as w:
            for i in range(num_samples):  # the JPEGs cyclically, so fixed start-up costs weigh little
                w.write({"id": f"b{i}", "image": jpegs[i % len(jpegs)], "image_id": f"b{i}",
                         "conversations": CONV, "source": "bench"})
    cpus = os.cpu_count() or 1
    index = work / ("index-ray" if use_ray else "index-local")
    cfg = DataConfig(datasets=[{"name": "bench", "path": str(shards)}], max_tokens=16384,
                     index_cache_dir=str(index), preprocess_batch_size=8, preprocess_concurrency=cpus)
    if use_ray:
        import ray

        ray.init(num_cpus=cpus + 2, include_dashboard=False, log_to_driver=False)
    out = []
    try:
        for epoch in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            it = build_train_iterator(cfg, tok_dir, 0, 1, epoch, use_ray=use_ray)
            for _ in it:
                pass
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            n = it.stats.num_samples
            # In-process, this process's CPU time is the whole cost; with Ray the work runs in other processes.
            out.append((epoch, n / seconds, cpus if use_ray else 1, None if use_ray else n / cpu))
    finally:
        if use_ray:
            ray.shutdown()
    return out


def packing_table(rows: int, tok_dir: str, work: Path) -> list[tuple]:
    from otterhd_ray.data.pipeline import schedule_epoch
    from otterhd_ray.data.synth import synthesize

    t0 = time.perf_counter()
    synthesize(work / "syn", num_train=rows, num_bench=0, seed=0)
    print(f"(synthesized {rows} rows in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    out = []
    # `rows` once (the tail of the epoch weighs a lot at this size), and 10 passes over them (each repeat draws
    # its own bucket, so lengths differ): closer to a real epoch of thousands of micro-batches.
    for num_samples in (-1, 10 * rows):
        for mode in ("random", "otterhd"):
            for max_tokens in (8192, 16384):
                for buffer in (32, 256):
                    spec = {"name": "syn", "path": str(work / "syn" / "train"), "num_samples": num_samples}
                    cfg = DataConfig(datasets=[spec], max_tokens=max_tokens, packing_buffer_size=buffer,
                                     buckets=BucketConfig(mode=mode), index_cache_dir=str(work / "index"))
                    s = schedule_epoch(cfg, tok_dir, 0, 1)
                    real = int(s.length.sum())
                    eff = real / (len(s.micro_batches) * max_tokens)
                    out.append((mode, max_tokens, buffer, len(s.micro_batches), int((s.length > 0).sum()), eff))
    return out


def write_llava_json(path: Path, n: int, pool: int) -> None:
    """A LLaVA JSON array of `n` records written as a stream (the benchmark input never sits in memory)."""
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            q = f"<image>\nWhat colour is the shape number {i}?" if i % 16 else f"Say hello #{i}."
            record = {"id": f"rec-{i:07d}", "conversations": [{"from": "human", "value": q},
                                                             {"from": "gpt", "value": "It is red, as drawn."}]}
            if i % 16:
                record["image"] = f"images/{i % pool:05d}.jpg"
            f.write(("," if i else "") + json.dumps(record) + "\n")
        f.write("]\n")


_CONVERT_CHILD = """
import json, sys, time
from otterhd_ray.data.formats import ConvertRequest, convert
t0, c0 = time.perf_counter(), time.process_time()
stats = convert(ConvertRequest("llava", [sys.argv[1]], sys.argv[2]), say=lambda _l: None)
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so it would report the (torch-laden) parent's.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"samples": stats.num_samples, "rejected": stats.num_rejected, "wall": time.perf_counter() - t0,
                  "cpu": time.process_time() - c0, "rss_kb": hwm}))
"""


def convert_table(sizes: list[int], pool: int, work: Path) -> None:
    folder = work / "convert"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    kb = 0
    for i in range(pool):
        image = draw_scene(random.Random(f"conv-{i}"), "colour", long_min=448, long_max=448).image.resize((448, 336))
        data = io.BytesIO()
        image.save(data, format="JPEG", quality=90)
        (folder / "images" / f"{i:05d}.jpg").write_bytes(data.getvalue())
        kb += len(data.getvalue()) / 1024
    print(f"\n| LLaVA records | JSON MB | accepted | samples/s (wall) | samples per CPU-second | peak RSS MB |  "
          f"(JPEG pool {pool} x {kb / pool:.0f} KB, load average {os.getloadavg()[0]:.1f})")
    print("|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for n in sizes:
        src, out = folder / f"llava_{n}.json", folder / f"out_{n}"
        write_llava_json(src, n, pool)
        proc = subprocess.run([sys.executable, "-c", _CONVERT_CHILD, str(src), str(out)], env=env,
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        total = r["samples"] + r["rejected"]
        print(f"| {n:,} | {src.stat().st_size / 2**20:.0f} | {r['samples']:,} | {total / r['wall']:,.0f} | "
              f"{total / r['cpu']:,.0f} | {r['rss_kb'] / 1024:.0f} |")
        shutil.rmtree(out, ignore_errors=True)
        src.unlink()
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--pack-rows", type=int, default=800)
    ap.add_argument("--pipeline-samples", type=int, default=384)
    ap.add_argument("--parts", default="core,pipeline,packing",
                    help="comma list of: core, pipeline, packing, convert")
    ap.add_argument("--convert-records", default="50000,200000", help="comma list of LLaVA JSON sizes")
    ap.add_argument("--convert-pool", type=int, default=1000, help="distinct JPEG files the records point at")
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--wall", action="store_true", help="time stages by wall clock instead of CPU time")
    args = ap.parse_args()
    global clock
    if args.wall:
        clock = time.perf_counter

    work = Path(tempfile.mkdtemp(prefix="otterhd-bench-"))
    tok_dir = str(work / "tok")
    build_tiny_tokenizer(tok_dir)
    proc = FuyuProcessor(load_tokenizer(tok_dir))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core: a per-core figure

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"command: python benchmarks/data_throughput.py {' '.join(sys.argv[1:])}")
    print(f"load average {os.getloadavg()[0]:.1f}; stage times are {'wall' if args.wall else 'CPU'} ms per sample\n")
    parts = set(args.parts.split(","))
    if "convert" in parts:
        convert_table([int(x) for x in args.convert_records.split(",")], args.convert_pool, work)
        if parts == {"convert"}:
            return
    print("| JPEGs (long side 1024) | buckets | draft | decode ms | resize ms | patchify ms | tokenize ms "
          "| total ms | samples/s/core | tokens/sample |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    policies = [
        ("random (448-1024+native)", BucketPolicy(BucketConfig(mode="random")), True),
        ("random (448-1024+native)", BucketPolicy(BucketConfig(mode="random")), False),
        ("otterhd squares 448/512/768", BucketPolicy(BucketConfig(mode="otterhd")), True),
        ("all at 1020 px", None, True),
    ]
    for noisy in (False, True) if "core" in parts else ():
        jpegs = make_jpegs(args.images, noisy)
        kb = sum(map(len, jpegs)) / len(jpegs) / 1024
        for name, policy, draft in policies:
            r = per_core(jpegs, proc, policy, draft, args.passes)
            kind = f"{'noisy' if noisy else 'synth scene'} ({kb:.0f} KB)"
            print(f"| {kind} | {name} | {'on' if draft else 'off'} | {1e3 * r['decode']:.1f} | "
                  f"{1e3 * r['resize']:.1f} | {1e3 * r['patchify']:.1f} | {1e3 * r['tokenize']:.2f} | "
                  f"{1e3 * r['total']:.1f} | {1 / r['total']:.0f} | {r['tokens']:.0f} |")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))

    jpegs = make_jpegs(args.images, False)
    load = os.getloadavg()[0]
    print(f"\n| whole pipeline, {args.pipeline_samples} samples (load average {load:.1f}) | epoch | wall samples/s "
          "| CPUs | wall samples/s/CPU | samples per CPU-second |")
    print("|---|---|---|---|---|---|")
    for use_ray in ([False, True] if args.ray else [False]) if "pipeline" in parts else ():
        name = "Ray Data map_batches (tasks)" if use_ray else "in-process (no Ray)"
        for epoch, rate, cpus, per_cpu_s in pipeline_throughput(jpegs, args.pipeline_samples, tok_dir, work,
                                                                use_ray):
            when = "0 (cold)" if epoch == 0 else str(epoch)
            cpu_col = f"{per_cpu_s:.0f}" if per_cpu_s else "n/a (other processes)"
            print(f"| {name} | {when} | {rate:.1f} | {cpus} | {rate / cpus:.1f} | {cpu_col} |")

    print("\n| buckets | max_tokens | packer buffer | micro-batches | samples | packing efficiency |")
    print("|---|---|---|---|---|---|")
    rows = packing_table(args.pack_rows, tok_dir, work) if "packing" in parts else []
    for mode, max_tokens, buffer, mbs, samples, eff in rows:
        print(f"| {mode} | {max_tokens} | {buffer} | {mbs} | {samples} | {eff:.2%} |")


if __name__ == "__main__":
    main()
