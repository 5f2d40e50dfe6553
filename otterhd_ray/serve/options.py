"""Serving options: one typed, strict record shared by `otterhd serve`, `serve run` configs and the RayService.

Unknown keys are an error naming the key (pydantic, extra="forbid"), as in the rest of the config tree. The API key
itself is never an option: `api_key_env` names the environment variable that holds it, read in each replica.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ServeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="HF model directory (ours or adept/fuyu-8b's layout), with its tokenizer")
    adapter: str | None = Field(None, description="LoRA adapter directory applied on top of `model`")
    name: str | None = Field(None, description="model id clients send and /v1/models lists (default: dir name)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    resolution: int = Field(-1, description="short side the image is scaled to before Fuyu's 1080x1920 cap; -1 off")
    prompt_style: Literal["otterhd", "fuyu"] = Field(
        "otterhd", description="otterhd: 'User:{q} Assistant:' as trained; fuyu: the raw text (base adept/fuyu-8b)")
    max_batch_size: int = Field(32, ge=1, description="requests decoded together in one batch")
    max_queue: int = Field(128, ge=1, description="requests waiting for a batch before answering 429")
    batch_wait_s: float = Field(0.01, ge=0, description="wait after the first queued request for more to batch")
    arrival_wait_s: float = Field(
        1.0, ge=0, description="longest a ready batch waits for requests still being prepared (image decode) to join")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request sets none")
    max_context: int | None = Field(None, ge=2, description="context limit (default: the model's positions)")
    share_prefix: bool = Field(True, description="requests with the same image share one prefill")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="request bodies over this are refused (413)")
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="encoded images over this are refused (413)")
    max_pixels: int = Field(40_000_000, ge=1, description="decoded images over this many pixels are refused (413)")
    fetch_timeout_s: float = Field(10.0, gt=0, description="timeout for http(s) image URLs")
    allow_local_dir: str | None = Field(None, description="local image paths allowed under this directory only")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (off when unset)")

    @property
    def served_name(self) -> str:
        return self.name or os.path.basename(os.path.normpath(self.model)) or "otterhd"

    def api_key(self) -> str | None:
        """The key from `api_key_env`; ValueError when the variable is named but empty (never echoes a value)."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ValueError(f"api_key_env names {self.api_key_env}, which is not set in this process")
        return key


def load_options(values: dict[str, Any], source: str = "serve options") -> ServeOptions:
    """Validate a mapping (CLI, Serve config `args`); ValueError naming the key and the source on a mistake."""
    try:
        return ServeOptions.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{source}: {problems}") from None
