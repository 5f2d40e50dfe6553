"""The `otterhd` command.

    otterhd data synth --out DIR [--train N] [--bench M] [--seed S] [--bad K]
    otterhd data convert --format llava|sharegpt|alpaca|hf|cauldron|mimicit|auto INPUT... --out DIR
                         [--image-root DIR] [--dataset-info dataset_info.json --dataset NAME] [--ray]
    otterhd data convert --instructions X.json --images Y.parquet --out DIR      (MIMIC-IT)
    otterhd data validate --format ... INPUT...                                   (same report, writes nothing)
    otterhd data stats --config FILE [key.path=value ...]
    otterhd finetune --config FILE [key.path=value ...]
    otterhd export CHECKPOINT OUT_DIR [--merge | --adapter-only]
    otterhd evaluate --config FILE            (--confg accepted, as the seed's README spells it)
    otterhd evaluate --predictions FILE (--config FILE | --benchmark NAME [--data-path P])
    otterhd serve --model DIR [--adapter DIR] [--replicas N] [--gpus-per-replica G] [--port P]
    otterhd chat --model DIR [--image FILE]
    otterhd demo [--workdir DIR]
    otterhd plot RUN_DIR                      (loss.png per metrics.jsonl, per_kind.png per evaluation)

Heavy modules (torch, ray, deepspeed) are imported inside each command so `otterhd --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "--confg", dest="config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.max_tokens=8192")


def _cmd_synth(args: argparse.Namespace) -> int:
    from otterhd_ray.data.synth import synthesize

    stats = synthesize(
        args.out, num_train=args.train, num_bench=args.bench, seed=args.seed, num_bad=args.bad, level=args.level,
        bench_seed=args.bench_seed,
    )
    print(json.dumps(stats, indent=2, default=str))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from otterhd_ray.data.formats import ConvertRequest, convert

    validate = args.data_command == "validate"
    inputs = list(args.inputs)
    fmt = args.format or ("mimicit" if args.instructions else "auto")
    if args.instructions:
        inputs = [args.instructions, *inputs]
    req = ConvertRequest(
        format=fmt, inputs=inputs, out_dir=None if validate else args.out, image_root=args.image_root,
        dataset_info=args.dataset_info, dataset=args.dataset, source=args.source, use_ray=args.ray,
        overwrite=getattr(args, "overwrite", False), progress=not args.no_progress,
        max_pixels=args.max_image_pixels, images=args.images, train_config=args.train_config,
        group_related=args.group_related,
    )
    stats = convert(req, say=lambda line: print(line, file=sys.stderr))
    print(stats)
    if stats.bad_files:
        print(f"otterhd: {len(stats.bad_files)} input file(s) could not be read (named above)", file=sys.stderr)
        return 1
    if stats.num_samples == 0:
        print("otterhd: no usable samples (reasons above)", file=sys.stderr)
        return 1
    return 0


# == otterhd_ray.data.formats.FORMATS (a test checks); literal here so `otterhd --help` imports nothing heavy
_FORMATS = ("llava", "sharegpt", "alpaca", "hf", "cauldron", "mimicit", "auto")


def _add_convert_args(p: argparse.ArgumentParser, validate: bool) -> None:
    p.add_argument("inputs", nargs="*", help="input files or directories (JSON / JSONL / parquet)")
    p.add_argument("--format", choices=_FORMATS, default=None,
                   help="input format (default: auto, or mimicit with --instructions)")
    if not validate:
        p.add_argument("--out", required=True, help="shard directory to write")
        p.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")
    p.add_argument("--image-root", default=None,
                   help="where relative image paths resolve (default: the input file's / dataset_info's dir)")
    p.add_argument("--dataset-info", default=None, help="LLaMA-Factory dataset_info.json (with --dataset)")
    p.add_argument("--dataset", default=None, help="entry of --dataset-info to convert")
    p.add_argument("--source", default=None, help="dataset name stored in each row (default: file stem)")
    p.add_argument("--ray", action="store_true", help="convert in parallel on Ray Data (files / chunks)")
    p.add_argument("--max-image-pixels", type=int, default=89_478_485,
                   help="refuse larger images (image_too_large); match data.max_image_pixels")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("MIMIC-IT")
    g.add_argument("--instructions", default=None, help="MIMIC-IT instructions JSON (implies --format mimicit)")
    g.add_argument("--images", default=None, help="images parquet (base64 column) or legacy id->base64 JSON")
    g.add_argument("--train-config", default=None, help="Otter train config JSON (ins id -> related ids)")
    g.add_argument("--group-related", action="store_true", help="rel_ins_ids become one multi-turn sample")


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from otterhd_ray.config import load_finetune_config
    from otterhd_ray.data.checks import check_data
    from otterhd_ray.data.pipeline import run_pipeline_stats

    cfg = load_finetune_config(args.config, args.overrides)
    cfg.data, _ = check_data(cfg.data, None)  # a corrupt / wrong-schema shard: one line naming it
    run_pipeline_stats(cfg, world_size=args.world_size)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from otterhd_ray.finetune import main as finetune_main

    return finetune_main(["--config", args.config, *args.overrides])


def _cmd_export(args: argparse.Namespace) -> int:
    from otterhd_ray.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, merge=args.merge, adapter_only=args.adapter_only)
    print(f"exported {'PEFT adapter' if args.adapter_only else 'HF model'} to {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from otterhd_ray.evaluate import main as evaluate_main

    argv = [*args.overrides]
    for flag in ("config", "predictions", "benchmark", "data_path", "split", "output_dir"):
        if getattr(args, flag) is not None:
            argv = [f"--{flag.replace('_', '-')}", getattr(args, flag), *argv]
    return evaluate_main(argv) or 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from otterhd_ray.demo import run_demo

    run_demo(args.workdir, steps=args.steps, verbose=args.verbose)
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from otterhd_ray.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from otterhd_ray.serve.cli import serve_main

    return serve_main(args)


def _cmd_chat(args: argparse.Namespace) -> int:
    from otterhd_ray.serve.cli import chat_command

    return chat_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otterhd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="generate synthetic training shards and a MagnifierBench-style benchmark")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=256, help="training samples")
    p.add_argument("--bench", type=int, default=32, help="benchmark items")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad", type=int, default=0, help="inject this many bad rows (to exercise rejects)")
    p.add_argument("--level", default="standard", help="scene difficulty: standard (MagnifierBench-like) | easy")
    p.add_argument("--bench-seed", type=int, default=None, help="benchmark seed (default --seed): held-out scenes")
    p.set_defaults(func=_cmd_synth)

    p = data.add_parser("convert", help="LLaVA / sharegpt / alpaca / HF parquet / the_cauldron / MIMIC-IT -> shards")
    _add_convert_args(p, validate=False)
    p.set_defaults(func=_cmd_convert)

    p = data.add_parser("validate", help="the conversion report (accepted, rejected by reason), writing nothing")
    _add_convert_args(p, validate=True)
    p.set_defaults(func=_cmd_convert)

    p = data.add_parser("stats", help="run the input pipeline once and print bucket/packing/reject stats")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, default=1)
    p.set_defaults(func=_cmd_data_stats)

    p = sub.add_parser("finetune", help="fine-tune with Ray Train + DeepSpeed")
    _add_config_args(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("export", help="training checkpoint -> HF model directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--merge", action="store_true", help="LoRA: merge the adapters into the base (the default)")
    kind.add_argument("--adapter-only", action="store_true", help="LoRA: a PEFT adapter directory")
    p.set_defaults(func=_cmd_export)

    from otterhd_ray.evaluate import build_parser as evaluate_parser

    p = sub.add_parser(
        "evaluate",
        help="benchmark evaluation (the seed's benchmark.yaml runs as is), or --predictions FILE to score",
        parents=[evaluate_parser()],
        add_help=False,
    )
    p.set_defaults(func=_cmd_evaluate)

    from otterhd_ray.serve.cli import add_chat_args, add_serve_args

    p = sub.add_parser("serve", help="OpenAI-compatible Ray Serve app (+ web page at /)")
    add_serve_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("chat", help="interactive terminal chat with a local model (no Serve)")
    add_chat_args(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("demo", help="synth -> finetune -> export -> evaluate on a local Ray, tiny model")
    p.add_argument("--workdir", default="demo_output")
    p.add_argument("--steps", default="all", help="comma list of: data,finetune,export,evaluate (default all)")
    p.add_argument("-v", "--verbose", action="store_true", help="every log line (Ray workers, DeepSpeed, ...)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("plot", help="PNG figures of a run: loss.png per metrics.jsonl, per_kind.png per evaluation")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        # user mistakes (bad config, bad paths, refusing to overwrite): one clear line, no traceback
        print(f"otterhd: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
