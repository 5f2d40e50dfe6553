"""Typed config of an evaluation run (`otterhd evaluate --config FILE`).

The seed's `benchmark.yaml` (OtterHD's `pipeline/benchmarks/evaluate.py`) parses as written:

    datasets: [{name: magnifierbench | mme | pope | mmbench | seedbench | scienceqa | mathvista | mmvet,
                split, data_path, prompt, api_key, ...}]
    models:   [{name: fuyu | otterhd, model_path, adapter_path (optional PEFT LoRA dir), resolution}]
    output:   evaluation.txt          # optional, the seed's log file

Our keys sit beside them at the top level (output dir, actors, batch size, ...) and under `judge:`. Every
section forbids unknown keys, so a typo is an error naming the key and the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

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
    """One entry of `datasets:` (the seed's dataset constructor kwargs, plus ours).

    `name` picks the benchmark module (`eval/benchmarks/<name>.py`); `data_path`, `split` and `config` default
    to that benchmark's hub dataset (e.g. mme -> lmms-lab/MME, test)."""

    name: str = Field("magnifierbench", description="A registered benchmark (otterhd_ray/eval/benchmarks).")
    split: str = Field("", description="Default: the benchmark's (test; mmbench dev; mathvista testmini).")
    data_path: str = Field(
        "",
        description="Local HF dataset dir / parquet file or dir, or a hub id (needs network and `datasets`); "
        "default: the benchmark's hub id.",
    )
    config: str | None = Field(
        None,
        description="HF dataset config (mmbench: en, scienceqa: ScienceQA-IMG); a sub-dir of a local copy.",
    )
    prompt: str = Field("", description="Prepended to every question (the seed's `prompt`), with a space.")
    post_prompt: str | None = Field(
        None, description="Appended to every question; default: the benchmark's (lmms-eval's) suffix."
    )
    api_key: SecretStr | None = Field(None, description="Judge key; else OPENAI_API_KEY / judge.api_key.")
    gpt_model: str | None = Field(
        None, description="The seed's per-dataset judge model; default judge.model."
    )
    cache_dir: str | None = Field(None, description="HF datasets cache dir (hub ids only).")
    debug: bool = Field(False, description="The seed's flag: log every question and answer.")
    max_items: int = Field(0, ge=0, description="Evaluate only the first N usable items; 0: all.")
    max_new_tokens: int | None = Field(
        None,
        gt=0,
        description="Answer length for this dataset; default: the benchmark's, else max_new_tokens.",
    )
    circular: bool = Field(
        True, description="mmbench: CircularEval (a question counts only if every copy is right)."
    )
    quick_extract: bool = Field(
        False,
        description="mathvista: take 'The answer is \"X\".' without asking the judge (official option).",
    )
    default_output_path: str | None = Field(
        None,
        description="The seed's per-dataset log dir; accepted and unused (everything goes to output_dir).",
    )

    _normalise_key = field_validator("api_key", mode="before")(_key_or_none)

    @model_validator(mode="before")
    @classmethod
    def _benchmark_defaults(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        from otterhd_ray.eval.benchmarks import get_benchmark  # the registry imports this module

        bench = get_benchmark(str(raw.get("name", "magnifierbench")))
        raw = dict(raw)
        raw["split"] = raw.get("split") or bench.default_split
        raw["data_path"] = raw.get("data_path") or bench.hub_id
        if raw.get("config") is None:
            raw["config"] = bench.default_config
        return raw


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
        if self.label:
            return self.label
        name = f"{self.name}:{Path(self.model_path.rstrip('/')).name or self.model_path}"
        # base and base + adapter in one YAML must not share a run directory (results.jsonl would be overwritten)
        return f"{name}+{Path(self.adapter_path.rstrip('/')).name}" if self.adapter_path else name


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
    models: list[BenchModelSpec] = Field(
        default_factory=list, description="Models to evaluate; none when scoring given predictions."
    )
    output: str | None = Field(None, description="The seed's log file; the report is also written there.")
    output_dir: str = Field("outputs/eval", description="metrics.json, report.md, per-item predictions.")
    num_actors: int = Field(1, gt=0, description="Predictor actors (one model copy each).")
    gpus_per_actor: float = Field(0.0, ge=0, description="0 on CPU; 1 per actor on a GPU node.")
    cpus_per_actor: float = Field(
        0.5, gt=0, description="Fractional by default so a small node keeps CPUs for Ray Data reads."
    )
    batch_size: int = Field(8, gt=0, description="Items per predictor call (2 generations each).")
    max_new_tokens: int = Field(
        64, gt=0, description="Answer length when neither the dataset nor its benchmark sets one."
    )
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
