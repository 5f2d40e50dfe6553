"""Training checkpoint -> HF directory (config, safetensors, tokenizer, processor config) for transformers.

`export_checkpoint(checkpoint_dir, out_dir)` reads a checkpoint written by `train/checkpoint.py` (DeepSpeed
ZeRO shards are consolidated into full fp32 weights with DeepSpeed's own `zero_to_fp32`, or the torch engine's
`model.pt`), rebuilds our model from the saved model shape and writes it with `models/fuyu/hf.py::save_hf`
(the literal key map). The tokenizer saved in the checkpoint is copied; the processor configs come from it when
the base model had them, else are written from transformers' Fuyu defaults (1080×1920 box, 30×30 patches).
`otterhd export CHECKPOINT OUT_DIR` and `train.save_hf_model: true` (in `otterhd_ray.finetune`) both call it.
Export sits above `train/` (it reads train's checkpoints); nothing in `train/` imports it.
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


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Write an HF Fuyu directory from a training checkpoint; returns `out_dir`.

    `dtype`: `auto` (the training precision: bf16 on GPU runs, fp32 on CPU ones), `bf16` or `fp32`.
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
    model_cfg = FuyuModelConfig.from_hf_dict(json.loads((src / MODEL_CONFIG_FILE).read_text()))
    torch_dtype = _resolve_dtype(dtype, src)
    state = consolidated_state_dict(src)

    # Meta-device build: no random init of billions of weights that are overwritten right away.
    model = new_model(model_cfg, dtype=torch_dtype, device="meta")
    missing, unexpected = model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=False,
                                                assign=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = Path(out_dir)
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
