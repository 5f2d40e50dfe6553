"""Does the demo's recipe learn? In process (no Ray): synth data -> fine-tune -> held-out MC accuracy.

    python benchmarks/demo_learning.py --level easy --train 384 --epochs 4 --lr 3e-3 --threads 2

The loop is the real one (`train_loop_per_worker` with a `LocalContext`, the torch engine), the evaluation the
real predictor and strict parser on the synthetic MagnifierBench of *another seed* (held out). It prints the
accuracy of the untrained model (same initialisation) and of the fine-tuned one, per question kind, and the
training wall time: the numbers behind the demo's level / model / steps / lr (README, `otterhd demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--level", default="easy")
    p.add_argument("--flavour", default="debug")
    p.add_argument("--train", type=int, default=384)
    p.add_argument("--bench", type=int, default=64)
    p.add_argument("--mc-fraction", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--long-sides", default="[240]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="Answer with the text of the correct option.")
    p.add_argument("--work", default=None, help="work dir (default: a temporary one)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="write results.json here")
    return p.parse_args(argv)


def evaluate(model: Any, tokenizer: Any, bench_dir: Path, prompt: str) -> dict[str, Any]:
    """MC accuracy (strict parser) on the synthetic bench, overall and per question kind."""
    import numpy as np

    from otterhd_ray.eval.benchmarks import format_for_model, get_benchmark
    from otterhd_ray.eval.config import BenchDatasetSpec
    from otterhd_ray.eval.predictor import Predictor
    from otterhd_ray.eval.scoring import parse_mc_strict

    spec = BenchDatasetSpec(name="magnifierbench", data_path=str(bench_dir), prompt=prompt)
    items = get_benchmark("magnifierbench")(spec).load().items
    predictor = Predictor.from_model(model, tokenizer, max_new_tokens=8, preprocess_threads=1)
    correct, total, replies = Counter(), Counter(), Counter()
    unparsed = 0
    for start in range(0, len(items), 8):
        chunk = items[start : start + 8]
        out = predictor({
            "id": np.asarray([it.id for it in chunk], dtype=object),
            "image": [it.image for it in chunk],
            "mc_text": [format_for_model("otterhd", it.prompts["mc"]) for it in chunk],
            "ff_text": [format_for_model("otterhd", it.prompts["ff"]) for it in chunk],
        })
        for it, reply in zip(chunk, out["mc_response"], strict=True):
            letter = parse_mc_strict(str(reply), it.doc["options"])
            unparsed += letter is None
            replies[str(reply)] += 1
            total[it.doc["kind"]] += 1
            correct[it.doc["kind"]] += letter == it.doc["answer"]
    n = sum(total.values())
    return {
        "mc_accuracy": sum(correct.values()) / max(n, 1),
        "per_kind": {k: correct[k] / total[k] for k in sorted(total)},
        "unparsed": unparsed,
        "items": n,
        "top_replies": replies.most_common(5),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from otterhd_ray.config import load_finetune_config
    from otterhd_ray.data.synth import synthesize
    from otterhd_ray.data.tokenizer import build_tiny_tokenizer, load_tokenizer
    from otterhd_ray.train.loop import LocalContext, build_model_for, train_loop_per_worker

    work = Path(args.work or tempfile.mkdtemp(prefix="demo-learning-"))
    t0 = time.perf_counter()
    synthesize(work / "data", num_train=args.train, num_bench=args.bench, seed=args.seed, level=args.level,
               bench_seed=args.seed + 1, mc_fraction=args.mc_fraction, mc_prompt=args.prompt)
    build_tiny_tokenizer(work / "tokenizer")
    synth_s = time.perf_counter() - t0
    cfg = load_finetune_config(None, [
        f"data.datasets=[{{name: synth, path: {work / 'data' / 'train'}}}]",
        f"data.tokenizer_path={work / 'tokenizer'}", f"data.index_cache_dir={work / 'index'}",
        f"data.max_tokens={args.max_tokens}", "data.buckets.mode=random",
        f"data.buckets.long_sides={args.long_sides}", "data.buckets.native=false",
        "data.instruction_template='User: {instruction} Assistant:'",
        f"model.flavour={args.flavour}", f"optim.lr={args.lr}", "optim.weight_decay=0.1",
        "optim.warmup_ratio=0.1", "deepspeed.enabled=false", "train.precision=fp32",
        f"train.epochs={args.epochs}", "train.log_every_steps=10", "train.checkpoint_at_end=false",
        f"train.output_dir={work / 'out'}", f"train.seed={args.seed}", "ray.num_workers=0",
    ])
    tokenizer = load_tokenizer(work / "tokenizer")
    models: list[Any] = []

    def factory(c: Any, device: Any) -> Any:
        models.append(build_model_for(c, device))
        return models[-1]

    bench = work / "data" / "magnifierbench"
    torch.manual_seed(args.seed)
    before = evaluate(build_model_for(cfg, torch.device("cpu")), tokenizer, bench, args.prompt)
    t1 = time.perf_counter()
    last = train_loop_per_worker({"config": cfg.model_dump()}, LocalContext(work / "ckpt"), model_factory=factory)
    train_s = time.perf_counter() - t1
    after = evaluate(models[-1], tokenizer, bench, args.prompt)
    result = {"args": vars(args), "synth_s": synth_s, "train_s": train_s, "steps": last.get("step"),
              "final_loss": last.get("loss"), "before": before, "after": after}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "demo_learning.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
