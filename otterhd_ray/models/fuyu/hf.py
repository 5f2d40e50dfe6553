"""transformers interop: a literal key map between our parameter names and HF `FuyuForCausalLM`'s.

`load_hf(dir)` reads a local HF Fuyu directory (`config.json` + safetensors, one file or sharded with
`model.safetensors.index.json`; pickle `.bin` files only with `allow_pickle=True`). It accepts both layouts HF
has used: transformers 5.x (`model.language_model.*`, `model.vision_embed_tokens.*`, `lm_head.*`) and the one
of the hub's `adept/fuyu-8b` / transformers 4.x (`language_model.model.*`, `language_model.lm_head.*`,
`vision_embed_tokens.*`). `save_hf(model, dir)` writes the 5.x layout, which `FuyuForCausalLM.from_pretrained`
loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from otterhd_ray.models.fuyu.config import FuyuModelConfig
from otterhd_ray.models.fuyu.model import FuyuForCausalLM, new_model

# Parameters of one decoder layer, named identically on both sides below the layer prefix.
LAYER_PARAMS = (
    "input_layernorm.weight",
    "input_layernorm.bias",
    "self_attn.query_key_value.weight",
    "self_attn.query_key_value.bias",
    "self_attn.dense.weight",
    "self_attn.dense.bias",
    "self_attn.q_layernorm.weight",
    "self_attn.q_layernorm.bias",
    "self_attn.k_layernorm.weight",
    "self_attn.k_layernorm.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
)

# layout name -> (prefix of the decoder stack, patch embedding prefix, lm head key)
LAYOUTS = {
    "v5": ("model.language_model.", "model.vision_embed_tokens.", "lm_head.weight"),
    "legacy": ("language_model.model.", "vision_embed_tokens.", "language_model.lm_head.weight"),
}


def key_map(cfg: FuyuModelConfig, layout: str = "v5") -> dict[str, str]:
    """ours -> HF, every key spelled out (no pattern rewriting)."""
    lm, vision, head = LAYOUTS[layout]
    out = {
        "embed_tokens.weight": f"{lm}embed_tokens.weight",
        "vision_embed_tokens.weight": f"{vision}weight",
        "vision_embed_tokens.bias": f"{vision}bias",
        "final_layernorm.weight": f"{lm}final_layernorm.weight",
        "final_layernorm.bias": f"{lm}final_layernorm.bias",
        "lm_head.weight": head,
    }
    for i in range(cfg.num_layers):
        for name in LAYER_PARAMS:
            if "q_layernorm" in name or "k_layernorm" in name:
                if not cfg.qk_layernorm:
                    continue
            out[f"layers.{i}.{name}"] = f"{lm}layers.{i}.{name}"
    return out


# ------------------------------------------------------------------------------------------------ reading
def _weight_files(root: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    indexes = {"safetensors": root / "model.safetensors.index.json", "bin": root / "pytorch_model.bin.index.json"}
    found = [k for k, index in indexes.items() if index.is_file()]
    if found:
        kind = found[0]
        files = sorted(set(json.loads(indexes[kind].read_text())["weight_map"].values()))
        paths = [root / f for f in files]
    else:
        paths, kind = sorted(root.glob("*.safetensors")), "safetensors"
        if not paths:
            paths, kind = sorted(root.glob("*.bin")), "bin"
    if not paths:
        raise ValueError(f"no weights found in {root} (expected model.safetensors or sharded safetensors)")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"weight files named by the index are missing in {root}: {[p.name for p in missing]}")
    if kind == "bin" and not allow_pickle:
        raise ValueError(
            f"{root} holds only pickle .bin weights, which can run arbitrary code when loaded; convert them to "
            "safetensors or set model.allow_pickle=true if you trust the source"
        )
    return paths, kind


def _iter_tensors(paths: list[Path], kind: str):
    if kind == "safetensors":
        from safetensors import safe_open

        for path in paths:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
    else:
        for path in paths:
            # weights_only: even when pickle is allowed, refuse arbitrary objects.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def _detect_layout(keys: set[str]) -> str:
    for layout, (lm, _, _) in LAYOUTS.items():
        if any(k.startswith(lm) for k in keys):
            return layout
    raise ValueError("not a Fuyu checkpoint: no key starts with 'model.language_model.' or 'language_model.model.'")


def read_config(path: str | Path) -> FuyuModelConfig:
    root = Path(path)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{root} is not an HF model directory: config.json is missing")
    return FuyuModelConfig.from_hf_dict(json.loads(config_file.read_text()))


def load_hf(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    num_layers: int | None = None,
    **switches: Any,
) -> FuyuForCausalLM:
    """Load a local HF Fuyu directory into our model. `num_layers` keeps only the first layers (benchmarks)."""
    root = Path(path)
    cfg = read_config(root)
    if num_layers:
        if num_layers > cfg.num_layers:
            raise ValueError(f"num_layers={num_layers} but the checkpoint has {cfg.num_layers}")
        cfg = cfg.replace(num_layers=num_layers)
    paths, kind = _weight_files(root, allow_pickle)
    tensors = dict(_iter_tensors(paths, kind)) if kind == "bin" else None
    keys = set(tensors) if tensors is not None else _safetensor_keys(paths)
    layout = _detect_layout(keys)
    ours_to_hf = key_map(cfg, layout)
    hf_to_ours = {v: k for k, v in ours_to_hf.items()}
    if dtype is None:
        dtype = torch.float32
    # Built on the meta device: no random init of billions of weights that are overwritten right away; each
    # tensor is converted straight to its final dtype/device and assigned.
    model = new_model(cfg, dtype=dtype, device="meta", **switches)
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    loaded: set[str] = set()
    skipped_layers = {f"{LAYOUTS[layout][0]}layers.{i}." for i in range(cfg.num_layers, _max_layer(keys, layout) + 1)}
    unexpected = []
    source = tensors.items() if tensors is not None else _iter_tensors(paths, kind)
    with torch.no_grad():
        for hf_key, tensor in source:
            ours = hf_to_ours.get(hf_key)
            if ours is None:
                if not any(hf_key.startswith(p) for p in skipped_layers) and not hf_key.endswith("rotary_emb.inv_freq"):
                    unexpected.append(hf_key)
                continue
            param = params[ours]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"{hf_key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}")
            state[ours] = tensor.to(device=device, dtype=dtype)
            loaded.add(ours)
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {root} does not match the Fuyu layout: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _safetensor_keys(paths: list[Path]) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    return keys


def _max_layer(keys: set[str], layout: str) -> int:
    prefix = f"{LAYOUTS[layout][0]}layers."
    indices = [int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)]
    return max(indices, default=-1)


# ------------------------------------------------------------------------------------------------ writing
def save_hf(
    model: FuyuForCausalLM, path: str | Path, max_shard_bytes: int = 5 * 2**30, base_only: bool = False
) -> None:
    """Write `model` as an HF directory (config.json + safetensors, sharded above `max_shard_bytes`).

    `base_only`: a model with (unmerged) LoRA adapters is written without them (the frozen base)."""
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    mapping = key_map(cfg, "v5")
    if getattr(model, "lora_spec", None) is not None and not base_only:
        raise ValueError("the model has LoRA adapters: merge them (lora.remove_lora) or pass base_only=True; "
                         "save adapters with peft.save_peft_adapter")
    # Adapter tensors (`.lora.` keys) are never part of an HF base directory.
    state = {k: v.detach() for k, v in model.state_dict().items() if ".lora." not in k}
    if set(state) != set(mapping):
        raise ValueError(f"model parameters do not match the key map: {sorted(set(state) ^ set(mapping))[:8]}")
    dtype = next(iter(state.values())).dtype
    hf_config = cfg.to_hf_dict()
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    (root / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    (root / "generation_config.json").write_text(json.dumps(generation, indent=2))

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for ours, hf_key in mapping.items():
        t = state[ours].to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][hf_key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(root / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
