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
    """Attach a PEFT LoRA adapter directory (ours or made with peft; `models/fuyu/peft.py::load_peft_adapter`
    checks it against the model), then merge it into the base weights once: serving pays no per-token adapter
    matmuls."""
    from otterhd_ray.models.fuyu.lora import remove_lora
    from otterhd_ray.models.fuyu.peft import load_peft_adapter

    load_peft_adapter(model, adapter_dir)
    return remove_lora(model, merge_first=True)


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
                      batch_wait_s=options.batch_wait_s, arrival_wait_s=options.arrival_wait_s, metrics=metrics)
    policy = ImagePolicy(max_image_bytes=options.max_image_bytes, max_pixels=options.max_pixels,
                         fetch_timeout_s=options.fetch_timeout_s, allow_local_dir=options.allow_local_dir)
    return ChatService(engine=engine, batcher=batcher, model_name=options.served_name, image_policy=policy,
                       resolution=options.resolution, max_body_bytes=options.max_body_bytes,
                       api_key=options.api_key(), metrics=metrics)
