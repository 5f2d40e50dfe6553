"""Training checkpoints: engine state + loop state (step, data position, RNG) in one directory per report.

Layout of one checkpoint directory (every rank writes its own files into a local temp dir; Ray Train merges
the ranks' directories into one in `storage_path` when they all call `ray.train.report`, Train V2 semantics):

    finetune_config.json          the FinetuneConfig that trained it
    model_config.json             the model shape as HF config keys (export rebuilds the model from it)
    train_state.json              step / epoch / data position / counters (rank 0; identical on every rank)
    rng_rank{r}.pt                python, numpy, torch (and CUDA) RNG states of rank r
    tokenizer/                    copy of the tokenizer directory (rank 0), so export needs nothing else
    base/                         LoRA on a random-init base only: that base as an HF dir (export merges into it)
    model.pt, optimizer.pt        TorchEngine, or
    deepspeed/...                 DeepSpeedEngine (`save_checkpoint(tag="deepspeed")`, per-rank ZeRO shards)
    COMPLETE_rank{r}              written last by each rank: a merged directory missing one is incomplete

Ray only registers a checkpoint after every rank has reported, so the latest registered checkpoint is complete;
the markers let `load_training_checkpoint` (and export) say so instead of failing deep inside DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otterhd_ray.train.engine import DS_TAG, TORCH_MODEL_FILE, Engine

CONFIG_FILE = "finetune_config.json"
MODEL_CONFIG_FILE = "model_config.json"  # our FuyuModelConfig as HF keys (export rebuilds the model from it)
STATE_FILE = "train_state.json"
TOKENIZER_DIR = "tokenizer"
LORA_BASE_DIR = "base"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
)


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def complete_marker(rank: int) -> str:
    return f"COMPLETE_rank{rank}"


@dataclass
class TrainState:
    """Where the loop is. `micro_batch` counts micro-batches of `epoch` already consumed by each rank."""

    global_step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    total_steps: int = 0
    world_size: int = 1
    tokens_seen: int = 0
    samples_seen: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}  # older checkpoints held a since-removed `data_state`
        return cls(**{k: v for k, v in raw.items() if k in known})


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _copy_tokenizer(src: str | Path | None, dst: Path) -> None:
    if not src or not Path(src).is_dir():
        return  # remote or absent tokenizer: export then writes weights and config only (and warns)
    dst.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)


def save_training_checkpoint(
    directory: str | Path,
    engine: Engine,
    state: TrainState,
    rank: int,
    config_json: str,
    tokenizer_dir: str | Path | None,
    extra_files: dict[str, str] | None = None,
    extra_dirs: dict[str, Path] | None = None,
) -> None:
    """Write this rank's part of a checkpoint into `directory` (all ranks call it; it does not report).

    `extra_files`: small text files rank 0 adds (the model shape for export); `extra_dirs`: directories rank 0
    copies in (a LoRA run's random base)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save(directory)
    torch.save(capture_rng(), directory / rng_file(rank))
    if rank == 0:
        (directory / STATE_FILE).write_text(state.to_json())
        (directory / CONFIG_FILE).write_text(config_json)
        _copy_tokenizer(tokenizer_dir, directory / TOKENIZER_DIR)
        for name, text in (extra_files or {}).items():
            (directory / name).write_text(text)
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, directory / name)
    (directory / complete_marker(rank)).write_text("ok\n")


def check_complete(directory: str | Path) -> TrainState:
    """The checkpoint's TrainState, after checking every rank's marker is there."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise ValueError(f"{directory} is not a training checkpoint (no {STATE_FILE})")
    state = TrainState.from_json((directory / STATE_FILE).read_text())
    missing = [r for r in range(state.world_size) if not (directory / complete_marker(r)).is_file()]
    if missing:
        raise ValueError(f"checkpoint {directory} is incomplete: ranks {missing} never finished writing it")
    return state


def load_training_checkpoint(directory: str | Path, engine: Engine, rank: int, world_size: int) -> TrainState:
    """Restore engine + RNG of this rank; return the loop state to continue from."""
    directory = Path(directory)
    state = check_complete(directory)
    if state.world_size != world_size:
        # ZeRO shards and the per-rank data split both depend on the world size.
        raise ValueError(
            f"checkpoint {directory} was written by {state.world_size} workers, this run has {world_size}; "
            "resume with the same ray.num_workers"
        )
    engine.load(directory)
    restore_rng(torch.load(directory / rng_file(rank), weights_only=False))
    return state


def checkpoint_kind(directory: str | Path) -> str:
    """`torch` or `deepspeed`, from the files present."""
    directory = Path(directory)
    if (directory / TORCH_MODEL_FILE).is_file():
        return "torch"
    if (directory / DS_TAG).is_dir():
        return "deepspeed"
    raise ValueError(f"{directory} holds neither {TORCH_MODEL_FILE} nor a {DS_TAG}/ DeepSpeed checkpoint")


def consolidated_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Full model weights (fp32 masters where DeepSpeed kept them) from a checkpoint, on CPU.

    Keys are the bare model's (`LossModule`'s `model.` prefix removed).
    """
    directory = Path(directory)
    check_complete(directory)
    if checkpoint_kind(directory) == "torch":
        return torch.load(directory / TORCH_MODEL_FILE, map_location="cpu")
    ds_dir = directory / DS_TAG
    if list(ds_dir.glob("*optim_states.pt")):
        # ZeRO 1-3: the fp32 master weights are partitioned over the optimizer shards of every rank.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DS_TAG)
    else:
        states = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
        if not states:
            raise ValueError(f"{ds_dir} holds no DeepSpeed model states")
        full = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    return {k.removeprefix("model."): v.float() for k, v in full.items()}
