"""Building a replica's parts from `ServeOptions`: model (+ LoRA adapter), tokenizer, engine, batcher, limits.

No Ray here: the Serve deployment, the chat command and the tests all build through these two functions.
"""

from __future__ import annotations

from typing import Any

from otterhd_ray.serve.app import ChatService
from otterhd_ray.serve.batcher import Batcher
from otterhd_ray.serve.engine import Engine
from otterhd_ray.serve.media import ImagePolicy
from otterhd_ray.serve.metrics import NullMetrics, ServeMetrics
from otterhd_ray.serve.options import ServeOptions


def load_adapter_into(model: Any, adapter_dir: str) -> Any:
    """Apply a LoRA adapter directory with the model package's own loader; refuse clearly where there is none."""
    import otterhd_ray.models.fuyu as fuyu

    loader = getattr(fuyu, "load_adapter", None)
    if loader is None:
        raise ValueError(
            f"--adapter {adapter_dir}: this install has no LoRA adapter loader (otterhd_ray.models.fuyu."
            "load_adapter); export a merged model with `otterhd export --merge` and serve that instead"
        )
    return loader(model, adapter_dir) or model


def load_engine(options: ServeOptions) -> Engine:
    """Model (+ adapter) and tokenizer from `options.model` on the chosen device -> an `Engine`."""
    from otterhd_ray.data.tokenizer import load_tokenizer
    from otterhd_ray.eval.predictor import pick_device, pick_dtype
    from otterhd_ray.models.fuyu import load_hf

    device = pick_device(options.device)
    model = load_hf(options.model, dtype=pick_dtype(options.dtype, device), device=device)
    if options.adapter:
        model = load_adapter_into(model, options.adapter)
    return Engine(model, load_tokenizer(options.model), prompt_style=options.prompt_style,
                  default_max_tokens=options.default_max_tokens, max_context=options.max_context,
                  share_prefix=options.share_prefix)


def build_service(options: ServeOptions, metrics: ServeMetrics | None = None) -> ChatService:
    """Engine, batcher and limits of one replica (no Ray needed: tests build it directly)."""
    engine = load_engine(options)
    metrics = metrics or NullMetrics()
    batcher = Batcher(engine.run_batch, max_batch_size=options.max_batch_size, max_queue=options.max_queue,
                      batch_wait_s=options.batch_wait_s, metrics=metrics)
    policy = ImagePolicy(max_image_bytes=options.max_image_bytes, max_pixels=options.max_pixels,
                         fetch_timeout_s=options.fetch_timeout_s, allow_local_dir=options.allow_local_dir)
    return ChatService(engine=engine, batcher=batcher, model_name=options.served_name, image_policy=policy,
                       resolution=options.resolution, max_body_bytes=options.max_body_bytes,
                       api_key=options.api_key(), metrics=metrics)
