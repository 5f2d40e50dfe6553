"""Typed config of an evaluation run (`otterhd evaluate --config FILE`).

The seed's `benchmark.yaml` (OtterHD's `pipeline/benchmarks/evaluate.py`) parses as written:

    datasets: [{name: magnifierbench, split, data_path, prompt, api_key}]
    models:   [{name: fuyu | otterhd, model_path, adapter_path (optional PEFT LoRA dir), resolution}]
    output:   evaluation.txt          # optional, the seed's log file

Our keys sit beside them at the top level (output dir, actors, batch size, ...) and under `judge:`. Every
section forbids unknown keys, so a typo is an error naming the key and the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator

from otterhd_ray.config import Strict, load_config

# Prices of the default judge (gpt-4-0613, USD per 1k tokens, OpenAI price list at the model's release); only
# used for the report's cost estimate, configurable for other models.
GPT4_0613_PROMPT_USD_PER_1K = 0.03
GPT4_0613_COMPLETION_USD_PER_1K = 0.06


def _key_or_none(value: Any) -> Any:
    """The seed's README writes `api_key: [You GPT-4 API]`, a YAML *list* holding a placeholder: no key."""
    if value is None or isinstance(value, SecretStr):
        return value
    if isinstance(value, str):
        value = value.strip()
        return value or None
    # A list, a number, a mapping: not a usable key. Never echo it (it may be a real key in the wrong shape).
    return None


class BenchDatasetSpec(Strict):
    """One entry of `datasets:` (the seed's MagnifierBench constructor kwargs)."""

    name: Literal["magnifierbench"] = "magnifierbench"
    split: str = "test"
    data_path: str = Field(
        "Otter-AI/MagnifierBench",
        description="Local HF dataset dir / parquet file or dir, or a hub id (needs network and `datasets`).",
    )
    prompt: str = Field("", description="Prepended to the multiple-choice instruction (the seed's `prompt`).")
    api_key: SecretStr | None = Field(None, description="Judge key; else OPENAI_API_KEY / judge.api_key.")
    cache_dir: str | None = Field(None, description="HF datasets cache dir (hub ids only).")
    debug: bool = Field(False, description="The seed's flag: log every question and answer.")
    max_items: int = Field(0, ge=0, description="Evaluate only the first N usable items; 0: all.")

    _normalise_key = field_validator("api_key", mode="before")(_key_or_none)


class BenchModelSpec(Strict):
    """One entry of `models:`."""

    name: Literal["fuyu", "otterhd"] = Field(
        description="Prompt convention: fuyu = the raw question; otterhd = `User: {q} Assistant:`."
    )
    model_path: str = Field(description="Local HF Fuyu directory (ours or adept/fuyu-8b layout).")
    adapter_path: str | None = Field(
        None, description="PEFT LoRA adapter directory applied to model_path (ours or made with peft); merged once "
        "at load, so decoding runs at the base model's speed."
    )
    resolution: int = Field(
        -1, description="Resize the image's short side to this before the 1080x1920 cap; -1: native size."
    )
    label: str | None = Field(None, description="Name in the report; default: name + model dir name.")

    @field_validator("resolution")
    @classmethod
    def _positive_or_native(cls, v: int) -> int:
        if v != -1 and v < 30:
            raise ValueError("resolution must be -1 (native) or at least 30 pixels (one patch)")
        return v

    @property
    def display_name(self) -> str:
        return self.label or f"{self.name}:{Path(self.model_path.rstrip('/')).name or self.model_path}"


class JudgeConfig(Strict):
    """Free-form judge: an OpenAI-compatible chat model, or a rule-based match when no key is available."""

    kind: Literal["auto", "openai", "rule"] = Field(
        "auto", description="auto: openai when a key is found, else rule; openai without a key is an error."
    )
    model: str = "gpt-4-0613"
    api_type: Literal["openai", "azure"] = "openai"
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint; for azure the azure_endpoint."
    )
    api_version: str | None = Field(None, description="Azure OpenAI API version (required for azure).")
    api_key: SecretStr | None = Field(None, description="Prefer OPENAI_API_KEY; never written anywhere.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the key.")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(8, gt=0, description="A yes/no needs one token; a little slack for 'Yes.'")
    concurrency: int = Field(8, gt=0, description="Requests in flight at once.")
    max_retries: int = Field(6, ge=0, description="Retries after the first try on 429 / 5xx / timeouts.")
    timeout: float = Field(30.0, gt=0, description="Seconds per request.")
    backoff_base: float = Field(1.0, gt=0, description="First backoff in seconds, doubled per retry.")
    backoff_max: float = Field(60.0, gt=0, description="Cap of one backoff, and of an honoured Retry-After.")
    cache_path: str | None = Field(
        None, description="JSONL verdict cache; default <output_dir>/judge_cache.jsonl."
    )
    prompt_usd_per_1k: float = Field(GPT4_0613_PROMPT_USD_PER_1K, ge=0)
    completion_usd_per_1k: float = Field(GPT4_0613_COMPLETION_USD_PER_1K, ge=0)

    _normalise_key = field_validator("api_key", mode="before")(_key_or_none)


class BenchmarkConfig(Strict):
    datasets: list[BenchDatasetSpec] = Field(min_length=1)
    models: list[BenchModelSpec] = Field(min_length=1)
    output: str | None = Field(None, description="The seed's log file; the report is also written there.")
    output_dir: str = Field("outputs/eval", description="metrics.json, report.md, per-item predictions.")
    num_actors: int = Field(1, gt=0, description="Predictor actors (one model copy each).")
    gpus_per_actor: float = Field(0.0, ge=0, description="0 on CPU; 1 per actor on a GPU node.")
    cpus_per_actor: float = Field(
        0.5, gt=0, description="Fractional by default so a small node keeps CPUs for Ray Data reads."
    )
    batch_size: int = Field(8, gt=0, description="Items per predictor call (2 generations each).")
    max_new_tokens: int = Field(64, gt=0)
    preprocess_threads: int = Field(4, gt=0, description="Threads per actor decoding and resizing images.")
    mc_parse: Literal["strict", "legacy"] = Field(
        "strict", description="strict: letter / 'The answer is X' / exact option; legacy: the seed's parser."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    ray_address: str | None = Field(None, description="Default: RAY_ADDRESS, else a local Ray.")
    resume: bool = Field(True, description="Skip items already predicted by an identical run in output_dir.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)


def load_benchmark_config(path: str | Path | None, overrides: list[str] | None = None) -> BenchmarkConfig:
    """Load a benchmark YAML (the seed's format plus our keys); errors name the key and the file."""
    return load_config(BenchmarkConfig, path, overrides)


def resolve_api_key(dataset: BenchDatasetSpec, judge: JudgeConfig) -> str | None:
    """The dataset's key (the seed's place), else judge.api_key, else the environment variable."""
    for secret in (dataset.api_key, judge.api_key):
        if secret is not None and secret.get_secret_value():
            return secret.get_secret_value()
    return os.environ.get(judge.api_key_env) or None
