"""MagnifierBench inference throughput: the seed's way vs transformers batched vs ours (issue 5, item 8).

    python benchmarks/eval_throughput.py --out docs/bench_eval_h100.md            # GPU: full Fuyu-8B shape
    python benchmarks/eval_throughput.py --tiny --items 4 --out /tmp/bench.md     # CPU dry run, debug model

Each item asks two questions about one 1920x1080 image (resolution 1440: short side -> 1440, then the 1080x1920
cap -> 36x64 patches, ~2,400-token prompts), the multiple-choice one and the free-form one, and every
generation produces exactly `--new-tokens` tokens (EOS suppressed), so the three methods do the same work:

  (a) seed:     transformers `FuyuForCausalLM.generate`, batch 1, the two questions one after the other;
  (b) hf-batch: transformers `generate` on 2 x B left-padded prompts per call, for each B in --hf-batch-sizes;
  (c) ours:     `otterhd_ray.eval.predictor.Predictor` (what each Ray actor runs) on B items = 2 x B prompts,
                for each B in --our-batch-sizes: the two questions of an item share one prefill of the image
                (+ `<s>` and common text) and one copy of its K/V (grouped cache), then KV-cache greedy decoding;
      ours-unshared: the same Predictor with `share_prefix=False` (every prompt prefilled and cached on its
                own: the reference path), for each B in --unshared-batch-sizes, as a same-run baseline.

Weights are random (same shape as adept/fuyu-8b, bf16 on GPU); the tokenizer is the tiny offline one (no
download), so prompts are a few tokens shorter than with Fuyu's real tokenizer. Pre-processing (decode, resize,
patchify, tokenize) is inside the timed loop for all three. transformers' own FuyuProcessor cannot run without
torchvision here, so (a) and (b) use our processor, which is tested to give its exact ids and patches.
An out-of-memory batch size is reported as OOM and the next one is tried. Numbers: mean over --items items
after one warm-up batch per configuration; peak memory = torch.cuda.max_memory_allocated for that
configuration.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import io
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otterhd_ray.data.images import decode_image  # noqa: E402
from otterhd_ray.data.processor import FuyuProcessor  # noqa: E402
from otterhd_ray.data.tokenizer import build_tiny_tokenizer  # noqa: E402
from otterhd_ray.eval.benchmarks import format_for_model  # noqa: E402
from otterhd_ray.eval.benchmarks.magnifierbench import mc_prompt  # noqa: E402
from otterhd_ray.eval.predictor import MAX_IMAGE_PIXELS, Predictor, resize_short_side  # noqa: E402
from otterhd_ray.models.fuyu import config_for_tokenizer, flavour_config, new_model, normalize_patches  # noqa: E402

PROMPT = "Answer with the option letter from the given choices directly."
INSTRUCTION = "What color is the small triangle in the image? A. orange, B. purple, C. blue, D. green"
QUESTION = "What color is the small triangle in the image?"


def make_image(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# ------------------------------------------------------------------------------------ transformers side
def build_hf_model(cfg: Any, dtype: torch.dtype, device: str, attn: str) -> Any:
    from transformers import FuyuConfig, FuyuForCausalLM

    hf_cfg = FuyuConfig(**cfg.to_hf_dict())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FuyuForCausalLM._from_config(hf_cfg, attn_implementation=attn, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class HFRunner:
    """Pre-process like the seed (per prompt) and call transformers' generate on a left-padded batch."""

    def __init__(self, model: Any, processor: FuyuProcessor, resolution: int, new_tokens: int, device: str):
        self.model, self.processor, self.resolution = model, processor, resolution
        self.new_tokens, self.device = new_tokens, device
        self.pad_id = processor.tokenizer.pad_token_id or 0
        self.dtype = next(model.parameters()).dtype

    def encode(self, image_bytes: bytes, text: str) -> dict[str, Any]:
        image = resize_short_side(decode_image(image_bytes, MAX_IMAGE_PIXELS), self.resolution)
        return self.processor.encode_prompt(image, text)

    def generate(self, samples: list[dict[str, Any]]) -> None:
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            ids[i, width - n :] = torch.as_tensor(s["input_ids"], dtype=torch.long)
            mask[i, width - n :] = 1
        # All items share one image size, so the patches stack into [B, P, 2700].
        patches = torch.stack([torch.from_numpy(s["patches"]) for s in samples]).to(self.device)
        patches = normalize_patches(patches).to(self.dtype)
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                image_patches=patches,
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
            )

    def seed_item(self, image_bytes: bytes, mc_text: str, ff_text: str) -> None:
        for text in (mc_text, ff_text):  # the seed: two sequential batch-1 generations per item
            self.generate([self.encode(image_bytes, text)])

    def batched(self, items: list[tuple[bytes, str, str]]) -> None:
        samples = []
        for image_bytes, mc_text, ff_text in items:
            samples += [self.encode(image_bytes, mc_text), self.encode(image_bytes, ff_text)]
        self.generate(samples)


# ---------------------------------------------------------------------------------------------- timing
def time_config(
    name: str, batch: int, items: list, run: Callable[[list], None], device: str
) -> dict[str, Any]:
    """Warm up on one batch, then time all `items` in batches of `batch` items."""
    row: dict[str, Any] = {"method": name, "batch_items": batch, "items": len(items)}
    try:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        run(items[:batch])
        sync(device)
        start = time.perf_counter()
        for k in range(0, len(items), batch):
            run(items[k : k + batch])
        sync(device)
        elapsed = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - record OOM and move on to the next configuration
        if not is_oom(err):
            raise
        row.update(status="OOM")
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        return row
    row.update(
        status="ok",
        seconds=elapsed,
        items_per_s=len(items) / elapsed,
        s_per_item=elapsed / len(items),
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    )
    return row


def run_predictor(pred: Predictor, batch: list) -> None:
    n = len(batch)
    pred(
        {
            "id": np.asarray([str(i) for i in range(n)], dtype=object),
            "image": np.asarray([b[0] for b in batch], dtype=object),
            "mc_text": np.asarray([b[1] for b in batch], dtype=object),
            "ff_text": np.asarray([b[2] for b in batch], dtype=object),
        }
    )


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]], baseline: float | None) -> str:
    lines = [
        "| method | batch (items) | items/s | s/item | vs seed | peak GiB | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ips = r.get("items_per_s")
        speedup = ips / baseline if (ips and baseline) else None
        lines.append(
            f"| {r['method']} | {r['batch_items']} | {_fmt(ips, '.3f')} | {_fmt(r.get('s_per_item'), '.3f')} "
            f"| {_fmt(speedup, '.2f')}{'x' if speedup else ''} | {_fmt(r.get('peak_gib'), '.1f')} | {r['status']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="debug-size model on CPU (dry run)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--layers", type=int, default=0, help="override the number of layers (0: flavour's)")
    p.add_argument("--items", type=int, default=32, help="items timed per configuration")
    p.add_argument("--seed-items", type=int, default=0, help="items for (a) (default: --items, it is slow)")
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--resolution", type=int, default=1440)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--attn", default="sdpa", help="transformers attn_implementation for (a)/(b)")
    p.add_argument("--hf-batch-sizes", default="4,8,16")
    p.add_argument("--our-batch-sizes", default="8,16,24,32")
    p.add_argument("--unshared-batch-sizes", default="16", help="(c) without prefix sharing")
    p.add_argument("--methods", default="seed,hf-batch,ours,ours-unshared")
    p.add_argument("--prep-threads", type=int, default=8, help="(c): image threads per actor")
    p.add_argument("--model-name", default="fuyu", choices=["fuyu", "otterhd"], help="prompt convention")
    p.add_argument("--out", required=True, help="markdown table path")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    methods = set(args.methods.split(","))
    tok = build_tiny_tokenizer(tempfile.mkdtemp(prefix="tok-"))
    cfg = config_for_tokenizer(flavour_config("debug" if args.tiny else "fuyu-8b"), tok)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    processor = FuyuProcessor(tok)
    images = [make_image(args.width, args.height, seed=i) for i in range(4)]
    mc_text = format_for_model(args.model_name, mc_prompt(INSTRUCTION, PROMPT))
    ff_text = format_for_model(args.model_name, QUESTION)
    items = [(images[i % len(images)], mc_text, ff_text) for i in range(args.items)]
    probe = processor.encode_prompt(
        resize_short_side(decode_image(images[0], MAX_IMAGE_PIXELS), args.resolution), mc_text
    )
    prompt_tokens = len(probe["input_ids"])
    print(
        f"device={device} dtype={dtype} layers={cfg.num_layers} hidden={cfg.hidden_size} vocab={cfg.vocab_size} "
        f"image={args.width}x{args.height}@{args.resolution} grid={tuple(int(x) for x in probe['grid'])} "
        f"MC prompt={prompt_tokens} tokens, new tokens={args.new_tokens}",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    if methods & {"seed", "hf-batch"}:
        hf_model = build_hf_model(cfg, dtype, device, args.attn)
        runner = HFRunner(hf_model, processor, args.resolution, args.new_tokens, device)
        if "seed" in methods:
            seed_items = items[: args.seed_items or args.items]
            rows.append(
                time_config(
                    f"(a) seed: HF generate batch 1 ({args.attn})",
                    1,
                    seed_items,
                    lambda b: [runner.seed_item(*it) for it in b],
                    device,
                )
            )
            print(rows[-1], flush=True)
        if "hf-batch" in methods:
            for bs in [int(x) for x in args.hf_batch_sizes.split(",") if x]:
                rows.append(
                    time_config(f"(b) HF generate batched ({args.attn})", bs, items, runner.batched, device)
                )
                print(rows[-1], flush=True)
        del runner, hf_model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if methods & {"ours", "ours-unshared"}:
        model = new_model(cfg, dtype=dtype, device=device)
        runs = [
            ("ours", True, args.our_batch_sizes, "(c) ours: Predictor (shared image prefill + grouped KV cache)"),
            ("ours-unshared", False, args.unshared_batch_sizes, "(c) ours, unshared: Predictor (packed prefill + KV cache)"),
        ]
        for method, share, sizes, label in runs:
            if method not in methods:
                continue
            pred = Predictor.from_model(
                model, tok, args.resolution, args.new_tokens, stop_ids=[], preprocess_threads=args.prep_threads,
                share_prefix=share,
            )
            for bs in [int(x) for x in sizes.split(",") if x]:
                rows.append(time_config(label, bs, items, functools.partial(run_predictor, pred), device))
                print(rows[-1], flush=True)

    seed_rows = [r for r in rows if r["method"].startswith("(a)") and r["status"] == "ok"]
    baseline = seed_rows[0]["items_per_s"] if seed_rows else None
    text = table(rows, baseline)
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    import transformers

    header = (
        f"Eval throughput, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {card}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {'debug' if args.tiny else 'fuyu-8b'} shape, "
        f"{cfg.num_layers} layers, {dtype}, {args.width}x{args.height} image at resolution {args.resolution} "
        f"(grid {tuple(int(x) for x in probe['grid'])}, MC prompt {prompt_tokens} tokens), "
        f"{args.new_tokens} new tokens per generation, 2 generations per item.\n"
        f"Command: `python benchmarks/eval_throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n"
    )
    print(header + "\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
