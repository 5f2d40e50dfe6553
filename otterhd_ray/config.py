"""One typed configuration tree for otterhd-ray.

Every section is a pydantic v2 model with ``extra="forbid"``: an unknown key is an error that names the key and
the file it came from. Configs are YAML files (``configs/``) plus dotted command-line overrides
(``data.max_tokens=8192``), applied before validation so overrides are type-checked like file values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The seed's training prompt: `User:{instruction} Assistant:\x04 {answer}` + end token. `\x04` is written as the
# literal token text `<0x04>` ("beginning of answer") so the tokenizer maps it to its special id.
SEED_TRAIN_TEMPLATE = "User:{instruction} Assistant:"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ----------------------------------------------------------------------------------------------- data
class DatasetSpec(Strict):
    """One entry of a data mix (the seed's `Demo_Data.yaml` entries)."""

    name: str
    path: str = Field(description="Shard directory, glob or file; local path or s3:// / gs:// URI.")
    num_samples: int = Field(
        -1, description="-1: every sample once; larger than the dataset: repeats; smaller: fixed-seed subsample."
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Files of `path` to leave out; the driver adds unreadable ones when data.on_bad_file is skip.",
    )


class BucketConfig(Strict):
    """Resolution buckets: the long side an image is resized to (aspect ratio kept)."""

    mode: Literal["random", "nearest", "otterhd"] = Field(
        "random",
        description="random: seeded choice per sample; nearest: bucket closest to the native size; "
        "otterhd: OtterHD's one random square of `otterhd_sizes` per batch (aspect ratio lost).",
    )
    long_sides: list[int] = Field(default_factory=lambda: [448, 512, 768, 1024])
    native: bool = Field(True, description="Also offer the native size, capped at `native_max_hw`.")
    native_max_hw: tuple[int, int] | None = Field(
        None, description="Cap (height, width) on every size; null: HF's FuyuImageProcessor box (models/fuyu/inputs.py)."
    )
    otterhd_sizes: list[int] = Field(default_factory=lambda: [448, 512, 768])

    @model_validator(mode="before")
    @classmethod
    def _renamed_from_seed(cls, raw: Any) -> Any:
        """`mode: seed` / `seed_sizes` (named after the original OtterHD code, easily read as the RNG seed
        `data.seed`) still load, with a warning, so configs written before the rename keep working."""
        if not isinstance(raw, dict):
            return raw
        raw, log = dict(raw), logging.getLogger(__name__)
        if raw.get("mode") == "seed":
            log.warning("config key data.buckets.mode: 'seed' is deprecated; write 'otterhd'")
            raw["mode"] = "otterhd"
        if "seed_sizes" in raw:
            if "otterhd_sizes" in raw:
                raise ValueError("data.buckets: give otterhd_sizes only (seed_sizes is its deprecated name)")
            log.warning("config key data.buckets.seed_sizes is deprecated; write data.buckets.otterhd_sizes")
            raw["otterhd_sizes"] = raw.pop("seed_sizes")
        return raw


class DataConfig(Strict):
    datasets: list[DatasetSpec] = Field(default_factory=list)
    tokenizer_path: str | None = Field(None, description="HF tokenizer dir; defaults to model.path.")
    instruction_template: str = SEED_TRAIN_TEMPLATE
    max_tokens: int = Field(16384, gt=0, description="Token budget of one packed micro-batch.")
    max_samples_per_batch: int = Field(0, ge=0, description="Cap on samples in a micro-batch; 0: none.")
    buckets: BucketConfig = Field(default_factory=BucketConfig)
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="Decompression-bomb limit (PIL's default); larger images are rejected."
    )
    preprocess_batch_size: int = Field(16, gt=0)
    preprocess_concurrency: int = Field(0, ge=0, description="Ray Data tasks for preprocessing; 0: auto.")
    rejects_path: str | None = Field(None, description="Where rejected rows are written (parquet).")
    seed: int = 0
    index_cache_dir: str | None = Field(
        None, description="Cache of per-row image sizes / text lengths; default ~/.cache/otterhd_ray/index."
    )
    packing_buffer_size: int = Field(256, gt=0, description="Samples the packer buffers per bucket group.")
    shuffle_window: int = Field(1024, gt=0, description="Rows shuffled together after the row-group shuffle.")
    draft_decode: bool = Field(True, description="JPEG draft (DCT-scaled) decode when the bucket is small.")
    on_bad_file: Literal["error", "skip"] = Field(
        "error",
        description="A corrupt or wrong-schema shard file: error = refuse to start naming it; skip = leave it out "
        "and count it (checked on the driver before any worker starts).",
    )


# ---------------------------------------------------------------------------------------------- model
class ModelConfig(Strict):
    flavour: Literal["fuyu-8b", "debug", "demo", "study"] = "debug"
    path: str | None = Field(None, description="Local HF Fuyu directory to load weights (and tokenizer) from.")
    num_layers: int | None = Field(None, description="Override the flavour's depth (benchmarks).")
    attention: Literal["auto", "flash", "varlen", "flex", "sdpa", "eager"] = "auto"
    compile: bool = False
    fused_ops: Literal["auto", "none", "compile", "triton", "liger"] = "auto"
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    selective_every: int = Field(
        2, ge=0, description="selective: recompute every N-th layer whole (compiles with fused_ops); "
        "0: op-level policy instead (keep matmul/attention outputs, recompute norms, rotary, relu²)."
    )
    loss_chunk_size: int = Field(2048, gt=0, description="Rows of logits materialised at once in the loss.")
    lean_step: bool = Field(
        True, description="Drop per-micro-batch fixed costs (sync-free image merge, deferred/compiled LM-head "
        "gradient); same values up to rounding. On by default: measured faster on both workloads (H200, "
        "docs/benchmarks.md, section lean_step: seed 71.6 -> 76.4 %, mixed 73.8 -> 76.1 % useful MFU); false = the reference path."
    )
    allow_pickle: bool = Field(False, description="Allow loading pickle `.bin` checkpoints (unsafe).")


LoraTarget = Literal["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head", "vision_embed_tokens"]


class LoraConfig(Strict):
    """Low-rank adapters (peft's LoRA maths and init); the base stays frozen, only adapters are trained."""

    enabled: bool = False
    r: int = Field(64, gt=0, description="Rank (Otter's recipe: 64; Mantis: 128).")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: scale = alpha / r (alpha / sqrt(r) with rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input (training only).")
    targets: list[LoraTarget] = Field(
        default_factory=lambda: ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        description="HF module names to adapt in every layer; lm_head and vision_embed_tokens are optional.",
    )
    rslora: bool = Field(False, description="Rank-stabilised scale alpha / sqrt(r).")
    init_from: str | None = Field(
        None, description="PEFT adapter directory to start from (continued training); its r and targets must match."
    )


# ------------------------------------------------------------------------------------------- training
class OptimConfig(Strict):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = Field(0.01, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")


class DeepSpeedConfig(Strict):
    enabled: bool = True
    stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    torch_adam: bool = Field(True, description="Use torch AdamW inside DeepSpeed (no JIT fused_adam build).")
    fused_torch_adam: bool | None = Field(
        None, description="With torch_adam: hand DeepSpeed torch's fused AdamW kernel (one launch for all "
        "tensors) instead of DeepSpeed's unfused torch AdamW. None: on GPU without optimizer offload."
    )


class TrainConfig(Strict):
    epochs: int = Field(1, gt=0)
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps; 0: run all epochs.")
    gradient_accumulation_steps: int = Field(1, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    checkpoint_every_steps: int = Field(0, ge=0, description="0: only at the end.")
    checkpoint_at_end: bool = Field(
        True, description="Checkpoint after the last step. Off only for throughput runs: without it nothing "
        "is saved and the run cannot be resumed or exported."
    )
    log_every_steps: int = Field(10, gt=0)
    save_hf_model: bool = False
    output_dir: str = "outputs"
    seed: int = 0
    log_samples: bool = Field(
        False, description="Append each step's sample indices to output_dir/samples/rank<r>.jsonl (audits)."
    )
    demo_data: bool = Field(
        False,
        description="Demo only: when data.datasets[0].path (a `<dir>/train` folder) or data.tokenizer_path is "
        "missing, generate synthetic shards (`otterhd data synth`) and the tiny offline tokenizer there first. "
        "Done by the entry point (`otterhd finetune`, `jobs/finetune.py`: `otterhd_ray.demo.ensure_demo_data`), "
        "not by `train.run_finetune`.",
    )


class RayConfig(Strict):
    address: str | None = Field(None, description="Cluster address; default: RAY_ADDRESS or a local cluster.")
    name: str = "otterhd"
    storage_path: str = Field("outputs/ray", description="Local dir or s3:// / gs:// URI for checkpoints.")
    num_workers: int = Field(1, ge=0)
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    num_to_keep: int = 2


class FaultsConfig(Strict):
    """Fault injection for the restart and resume tests; every field off by default. A misspelt key is an error
    like anywhere else, so a test cannot pass because its fault was silently never armed."""

    fail_at_step: int | None = Field(
        None, gt=0, description="SIGKILL the worker of rank `fail_rank` right after this optimizer step, once."
    )
    fail_rank: int = Field(0, ge=0, description="Rank killed by `fail_at_step`.")
    fail_marker: str | None = Field(
        None, description="File written just before the kill; its presence stops a restarted worker dying again."
    )
    stop_after_step: int | None = Field(
        None, gt=0, description="Raise `InjectedStop` right after this step is logged and checkpointed."
    )

    @model_validator(mode="after")
    def _kill_needs_marker(self) -> FaultsConfig:
        if self.fail_at_step is not None and not self.fail_marker:
            raise ValueError("faults.fail_at_step needs faults.fail_marker (the kill happens once, per marker)")
        return self


class TrainEvalConfig(Strict):
    """`eval:` of a fine-tune: a benchmark run on the training workers' own model during training.

    Items are sharded over the ranks and answered with the model's batched greedy `generate` (the evaluation
    predictor's prompt building), scored with the benchmark's official metric, and logged to the eval history,
    wandb, Ray's metrics and `ray.train.report`. Training data, randomness, checkpoints and resume are not
    affected (docs/internals.md "Training loop seam")."""

    benchmark: str = Field("magnifierbench", description="A registered benchmark (otterhd_ray/eval/benchmarks).")
    data_path: str = Field("", description="Local HF dataset dir / parquet (or hub id); default: the benchmark's.")
    split: str = Field("", description="Default: the benchmark's split.")
    config: str | None = Field(None, description="HF dataset config (mmbench: en, scienceqa: ScienceQA-IMG).")
    prompt: str = Field("", description="Prepended to every question with a space (the seed's `prompt`).")
    post_prompt: str | None = Field(None, description="Appended to every question; default: the benchmark's.")
    max_items: int = Field(
        0, ge=0, description="Evaluate the first N usable items (the same subset every time); 0: all."
    )
    model_name: Literal["fuyu", "otterhd"] = Field(
        "otterhd", description="Prompt convention: fuyu = the raw question; otterhd = `User: {q} Assistant:`."
    )
    resolution: int = Field(-1, description="Short side the image is resized to first; -1: native size.")
    max_new_tokens: int | None = Field(
        None, gt=0, description="Answer length; default: the benchmark's, else 64."
    )
    batch_size: int = Field(8, gt=0, description="Items per generate call on each rank.")
    every_n_steps: int = Field(0, ge=0, description="Evaluate after every N-th optimizer step; 0: never.")
    at_epoch_end: bool = Field(True, description="Evaluate after the last step of every epoch.")
    at_end: bool = Field(True, description="Evaluate after the run's last step (also when max_steps cuts it).")
    mc_parse: Literal["strict", "legacy"] = Field("strict", description="Multiple-choice parser (see evaluate).")
    judge: Literal["rule"] = Field(
        "rule", description="Free-form answers: the rule judge only (no API calls or keys on training workers); "
        "score them with the GPT judge through `otterhd evaluate` on the exported checkpoint."
    )

    @model_validator(mode="after")
    def _some_trigger(self) -> TrainEvalConfig:
        if not (self.every_n_steps or self.at_epoch_end or self.at_end):
            raise ValueError("eval: set every_n_steps, at_epoch_end or at_end (or drop the eval section)")
        if self.resolution != -1 and self.resolution < 30:
            raise ValueError("eval.resolution must be -1 (native) or at least 30 pixels (one patch)")
        return self


class WandbConfig(Strict):
    enabled: bool = False
    project: str = "otterhd-ray"
    entity: str | None = None
    run_name: str | None = None
    mode: Literal["offline", "online"] = "offline"


class FinetuneConfig(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig, description="Tests only: fault injection.")
    eval: TrainEvalConfig | None = Field(None, description="Evaluation inside the training job; none: off.")

    @model_validator(mode="after")
    def _tokenizer_defaults_to_model(self) -> FinetuneConfig:
        if self.data.tokenizer_path is None and self.model.path is not None:
            self.data.tokenizer_path = self.model.path
        if self.lora.init_from and not self.lora.enabled:
            raise ValueError("lora.init_from is set but lora.enabled is false")
        return self


# ------------------------------------------------------------------------------------------- loading
class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key and the file."""


C = TypeVar("C", bound=BaseModel)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["data.max_tokens=8192", "ray.use_gpu=true"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate_config(cls: type[C], raw: dict[str, Any], source: str = "<dict>") -> C:
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, not {type(raw).__name__}")
    return raw


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load `path` (YAML) into `cls`, applying dotted `overrides` first; errors name key and file."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
        source += " (with command-line overrides)"
    return validate_config(cls, raw, source)


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    return load_config(FinetuneConfig, path, overrides)
