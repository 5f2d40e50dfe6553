"""Arguments and entry points of `otterhd serve` and `otterhd chat` (argparse only at import: `--help` is instant)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

# CLI flag -> ServeOptions key, for the options both commands share.
_MODEL_FLAGS = ("model", "adapter", "device", "dtype", "resolution", "prompt_style")
_SERVE_FLAGS = ("name", "max_batch_size", "max_queue", "batch_wait_s", "arrival_wait_s", "default_max_tokens",
                "max_context", "max_body_bytes", "max_image_bytes", "max_pixels", "fetch_timeout_s", "allow_local_dir",
                "api_key_env")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (with its tokenizer)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory to apply on top of --model")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--resolution", type=int, default=-1, help="scale the image's short side to this first (-1 off)")
    p.add_argument("--prompt-style", choices=("otterhd", "fuyu"), default="otterhd",
                   help="otterhd: 'User:{q} Assistant:' as trained; fuyu: raw text for base adept/fuyu-8b")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas (one model + queue each)")
    p.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 where CUDA is visible, else 0")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="model id clients send (default: the model directory's name)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=128, help="waiting requests per replica before 429")
    p.add_argument("--batch-wait-s", type=float, default=0.01)
    p.add_argument("--arrival-wait-s", type=float, default=1.0,
                   help="longest a ready batch waits for requests still decoding their image")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--max-body-bytes", type=int, default=32 * 2**20)
    p.add_argument("--max-image-bytes", type=int, default=20 * 2**20)
    p.add_argument("--max-pixels", type=int, default=40_000_000)
    p.add_argument("--fetch-timeout-s", type=float, default=10.0)
    p.add_argument("--allow-local-dir", default=None, help="allow local image paths under this directory")
    p.add_argument("--api-key-env", default=None,
                   help="name of the environment variable holding the API key (clients send it as Bearer)")


def add_chat_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--image", default=None, help="image file to talk about (or /image PATH in the chat)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _options(args: argparse.Namespace, keys: tuple[str, ...]) -> Any:
    from otterhd_ray.serve.options import load_options

    return load_options({k: getattr(args, k) for k in keys}, "command line")


def chat_command(args: argparse.Namespace) -> int:
    from otterhd_ray.serve.chat import chat_main

    return chat_main(_options(args, _MODEL_FLAGS), args.image, args.max_tokens, args.temperature, args.top_p,
                     args.seed)


def serve_main(args: argparse.Namespace) -> int:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, deploy the app, and serve until Ctrl-C."""
    import ray
    from ray import serve

    from otterhd_ray.serve.deployment import make_app

    opts = _options(args, _MODEL_FLAGS + _SERVE_FLAGS)
    if opts.api_key_env:
        opts.api_key()  # fail here, not in every replica, when the variable is missing
    if not os.path.isdir(opts.model):
        raise ValueError(f"--model {opts.model}: no such directory")
    if opts.adapter:
        from otterhd_ray.models.fuyu.peft import read_spec

        read_spec(opts.adapter)  # a bad adapter directory fails here, named, not later in every replica
    gpus = args.gpus_per_replica
    if gpus is None:
        import torch

        gpus = 1 if torch.cuda.is_available() else 0
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = make_app(opts, num_replicas=args.replicas, num_gpus=gpus)
    try:
        serve.run(app, name="otterhd", route_prefix="/")
        print(f"serving {opts.served_name} at http://{args.host}:{args.port}/v1 (web page at /); Ctrl-C stops",
              flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
        serve.shutdown()
    return 0
