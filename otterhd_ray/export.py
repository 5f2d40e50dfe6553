"""Training checkpoint -> HF directory (config, safetensors, tokenizer, processor config) for transformers.

`export_checkpoint(checkpoint_dir, out_dir)` reads a checkpoint written by `train/checkpoint.py` (DeepSpeed
ZeRO shards are consolidated into full fp32 weights with DeepSpeed's own `zero_to_fp32`, or the torch engine's
`model.pt`), rebuilds our model from the saved model shape and writes it with `models/fuyu/hf.py::save_hf`
(the literal key map). The tokenizer saved in the checkpoint is copied; the processor configs come from it when
the base model had them, else are written from transformers' Fuyu defaults (1080×1920 box, 30×30 patches).
`otterhd export CHECKPOINT OUT_DIR` and `train.save_hf_model: true` (in `otterhd_ray.finetune`) both call it.
Export sits above `train/` (it reads train's checkpoints); nothing in `train/` imports it.

LoRA checkpoints (`lora.enabled`) hold the adapters only. `adapter_only=True` (`--adapter-only`) writes a PEFT
adapter directory (`adapter_config.json` + `adapter_model.safetensors`, peft's keys for transformers'
`FuyuForCausalLM`); the default (and `--merge`) loads the base (`model.path`, or the checkpoint's `base/` for a
random-init base), merges B·A·scale into it and writes a plain HF directory.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

logger = logging.getLogger("otterhd_ray.export")


def _resolve_dtype(dtype: str, checkpoint_dir: Path) -> torch.dtype:
    if dtype == "auto":
        from otterhd_ray.config import FinetuneConfig
        from otterhd_ray.train.checkpoint import CONFIG_FILE
        from otterhd_ray.train.deepspeed import resolve_precision

        cfg = FinetuneConfig.model_validate_json((checkpoint_dir / CONFIG_FILE).read_text())
        dtype = resolve_precision(cfg.train.precision, cfg.ray.use_gpu)
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ValueError(f"export dtype must be auto, bf16 or fp32, got {dtype!r}")
    return table[dtype]


def _write_processor(out: Path) -> None:
    """Processor configs from transformers' Fuyu defaults, unless the tokenizer copy already brought them."""
    if (out / "preprocessor_config.json").is_file():
        return
    from transformers import FuyuImageProcessor, FuyuProcessor
    from transformers import PreTrainedTokenizerFast as Tok

    image_processor = FuyuImageProcessor()
    image_processor.save_pretrained(str(out))
    if not (out / "processor_config.json").is_file():
        FuyuProcessor(image_processor=image_processor, tokenizer=Tok.from_pretrained(str(out))).save_pretrained(
            str(out)
        )


def export_checkpoint(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    merge: bool = False,
    adapter_only: bool = False,
) -> Path:
    """Write an HF Fuyu directory (or, `adapter_only`, a PEFT adapter directory) from a training checkpoint.

    `dtype`: `auto` (the training precision: bf16 on GPU runs, fp32 on CPU ones), `bf16` or `fp32`. `merge`:
    LoRA checkpoints only (their default anyway): base + adapters merged into one HF directory.
    """
    from otterhd_ray.models.fuyu.config import FuyuModelConfig
    from otterhd_ray.models.fuyu.hf import save_hf
    from otterhd_ray.models.fuyu.model import new_model
    from otterhd_ray.train.checkpoint import MODEL_CONFIG_FILE, TOKENIZER_DIR, consolidated_state_dict

    src = Path(checkpoint_dir)
    if not src.is_dir():
        raise ValueError(f"checkpoint directory not found: {src}")
    if not (src / MODEL_CONFIG_FILE).is_file():
        raise ValueError(f"{src} has no {MODEL_CONFIG_FILE}: not a checkpoint written by otterhd finetune")
    if merge and adapter_only:
        raise ValueError("choose one of --merge and --adapter-only")
    model_cfg = FuyuModelConfig.from_hf_dict(json.loads((src / MODEL_CONFIG_FILE).read_text()))
    torch_dtype = _resolve_dtype(dtype, src)
    lora_cfg = _lora_config(src)
    if (merge or adapter_only) and lora_cfg is None:
        raise ValueError(f"{src} is a full fine-tune checkpoint (lora.enabled was false): --merge and "
                         "--adapter-only apply to LoRA checkpoints; export it without them")
    state = consolidated_state_dict(src)
    out = Path(out_dir)
    if lora_cfg is not None:
        model = _lora_model(src, model_cfg, lora_cfg, state, torch_dtype, adapter_only)
        if adapter_only:
            from otterhd_ray.models.fuyu.peft import save_peft_adapter

            save_peft_adapter(model, out, base_model_name_or_path=_base_path(src, lora_cfg))
            logger.info("exported the LoRA adapter of %s -> %s (PEFT format)", src, out)
            return out
        from otterhd_ray.models.fuyu.lora import remove_lora

        remove_lora(model, merge_first=True)
    else:
        # Meta-device build: no random init of billions of weights that are overwritten right away.
        model = new_model(model_cfg, dtype=torch_dtype, device="meta")
        missing, unexpected = model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()},
                                                    strict=False, assign=True)
        if missing or unexpected:
            raise ValueError(f"checkpoint weights do not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    save_hf(model, out)
    tok = src / TOKENIZER_DIR
    if tok.is_dir():
        for f in tok.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        _write_processor(out)
    else:
        logger.warning("checkpoint %s holds no tokenizer; %s has weights and config only", src, out)
    logger.info("exported %s -> %s (%s)", src, out, torch_dtype)
    return out


# ---------------------------------------------------------------------------------------------- LoRA
def _lora_config(src: Path):
    """The checkpoint's `LoraConfig` when it trained adapters, else None."""
    from otterhd_ray.config import FinetuneConfig
    from otterhd_ray.train.checkpoint import CONFIG_FILE

    if not (src / CONFIG_FILE).is_file():
        return None
    lora = FinetuneConfig.model_validate_json((src / CONFIG_FILE).read_text()).lora
    return lora if lora.enabled else None


def _base_path(src: Path, lora_cfg) -> str:
    """Where the frozen base lives: model.path, or the checkpoint's own copy of a random-init base."""
    from otterhd_ray.config import FinetuneConfig
    from otterhd_ray.train.checkpoint import CONFIG_FILE, LORA_BASE_DIR

    path = FinetuneConfig.model_validate_json((src / CONFIG_FILE).read_text()).model.path
    if path:
        return path
    if (src / LORA_BASE_DIR).is_dir():
        return str(src / LORA_BASE_DIR)
    raise ValueError(f"{src}: LoRA checkpoint without model.path and without a {LORA_BASE_DIR}/ copy of its base")


def _lora_model(src: Path, model_cfg, lora_cfg, state: dict[str, torch.Tensor], dtype: torch.dtype, meta_base: bool):
    """Our model with the checkpoint's adapters: on a meta base (adapter export) or on the real base (merge)."""
    from otterhd_ray.config import FinetuneConfig
    from otterhd_ray.models.fuyu.hf import load_hf
    from otterhd_ray.models.fuyu.lora import adapter_state_dict, add_lora, spec_from
    from otterhd_ray.models.fuyu.model import new_model
    from otterhd_ray.train.checkpoint import CONFIG_FILE

    if meta_base:
        model = new_model(model_cfg, dtype=dtype, device="meta")
    else:
        num_layers = FinetuneConfig.model_validate_json((src / CONFIG_FILE).read_text()).model.num_layers
        model = load_hf(_base_path(src, lora_cfg), dtype=dtype, num_layers=num_layers)
        if model.config.to_hf_dict() != model_cfg.to_hf_dict():
            raise ValueError(f"the base {_base_path(src, lora_cfg)} has another shape than the one {src} trained on")
    add_lora(model, spec_from(lora_cfg))
    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        raise ValueError(f"{src}: checkpoint tensors are not this run's adapters: {sorted(set(state) ^ expected)[:4]}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    return model
