"""Shape of a Fuyu model: the `fuyu-8b` flavour (HF `adept/fuyu-8b`) and a tiny `debug` one.

`FuyuModelConfig` is plain data; it converts to and from the keys of a transformers `FuyuConfig` (`config.json`)
so a checkpoint written by us loads in transformers and the reverse.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from otterhd_ray.models.fuyu.inputs import NUM_CHANNELS, PATCH_DIM, PATCH_SIZE


@dataclass(frozen=True)
class FuyuModelConfig:
    """Architecture hyper-parameters (Persimmon decoder + one linear patch embedding)."""

    vocab_size: int = 262_144
    hidden_size: int = 4096
    intermediate_size: int = 16_384
    num_layers: int = 36
    num_heads: int = 64
    partial_rotary_factor: float = 0.5
    rope_theta: float = 25_000.0
    layer_norm_eps: float = 1e-5
    qk_layernorm: bool = True
    max_position_embeddings: int = 16_384
    patch_dim: int = PATCH_DIM
    # Token ids the model itself needs. The image placeholder (|SPEAKER|) must match the tokenizer; the other
    # ids are only written to config.json for transformers' generate defaults.
    image_token_id: int = 71_011
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    extra_hf: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        rotary = self.head_dim * self.partial_rotary_factor
        if rotary != int(rotary) or int(rotary) % 2:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor} gives an odd/fractional rotary dim")
        if not 0 <= self.image_token_id < self.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} outside the vocabulary ({self.vocab_size})")
        if self.num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {self.num_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def replace(self, **changes: Any) -> FuyuModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        D, F, V, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        per_layer = (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D) + 4 * D + 4 * self.head_dim
        return 2 * V * D + (self.patch_dim * D + D) + L * per_layer + 2 * D

    # ---------------------------------------------------------------------------------- transformers interop
    def to_hf_dict(self) -> dict[str, Any]:
        """Keys of a transformers `FuyuConfig` (5.x); `FuyuConfig(**d)` builds the same architecture."""
        d: dict[str, Any] = dict(self.extra_hf)
        d.update(
            model_type="fuyu",
            architectures=["FuyuForCausalLM"],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            hidden_act="relu2",
            max_position_embeddings=self.max_position_embeddings,
            patch_size=PATCH_SIZE,
            num_channels=NUM_CHANNELS,
            layer_norm_eps=self.layer_norm_eps,
            qk_layernorm=self.qk_layernorm,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor,
            },
            partial_rotary_factor=self.partial_rotary_factor,
            tie_word_embeddings=False,
            image_token_id=self.image_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> FuyuModelConfig:
        """Parse a `config.json` of transformers 4.x (flat rope keys) or 5.x (`rope_parameters`)."""
        if d.get("model_type", "fuyu") != "fuyu":
            raise ValueError(f"not a Fuyu config: model_type={d.get('model_type')!r}")
        text = d.get("text_config") or {}
        if not isinstance(text, dict):
            text = {}

        def pick(key: str, default: Any) -> Any:
            # transformers writes the decoder shape both at top level and in text_config; the latter wins.
            return text.get(key, d.get(key, default))

        rope = pick("rope_parameters", None) or pick("rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported rope type {rope!r}: only the default Persimmon rotary is implemented")
        act = pick("hidden_act", "relu2")
        if act != "relu2":
            raise ValueError(f"unsupported hidden_act {act!r}: Fuyu uses relu2")
        patch = d.get("patch_size", PATCH_SIZE), d.get("num_channels", NUM_CHANNELS)
        eos = pick("eos_token_id", 2)
        return cls(
            vocab_size=pick("vocab_size", 262_144),
            hidden_size=pick("hidden_size", 4096),
            intermediate_size=pick("intermediate_size", 16_384),
            num_layers=pick("num_hidden_layers", 36),
            num_heads=pick("num_attention_heads", 64),
            partial_rotary_factor=float(
                rope.get("partial_rotary_factor", pick("partial_rotary_factor", d.get("partial_rotary_factor", 0.5)))
            ),
            rope_theta=float(rope.get("rope_theta", pick("rope_theta", 25_000.0))),
            layer_norm_eps=float(pick("layer_norm_eps", 1e-5)),
            qk_layernorm=bool(pick("qk_layernorm", True)),
            max_position_embeddings=pick("max_position_embeddings", 16_384),
            patch_dim=patch[0] * patch[0] * patch[1],
            image_token_id=d.get("image_token_id", 71_011),
            bos_token_id=pick("bos_token_id", 1),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=pick("pad_token_id", None),
        )


# Tiny model for CPU tests and the demo. Vocabulary and ids fit the tiny offline tokenizer
# (otterhd_ray.data.tokenizer: 543 entries, |SPEAKER| = 259); with another tokenizer call
# `config_for_tokenizer` so the special ids match it.
_DEBUG = FuyuModelConfig(
    vocab_size=576,
    hidden_size=64,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    max_position_embeddings=8192,
    image_token_id=259,
)

FLAVOURS: dict[str, FuyuModelConfig] = {
    # HF adept/fuyu-8b: Persimmon-8B decoder, ~9.4 B parameters.
    "fuyu-8b": FuyuModelConfig(),
    "debug": _DEBUG,
    # The demo's model: `debug` at twice the width, which learns the easy synthetic level in about a minute on
    # a CPU (benchmarks/demo_learning.py).
    "demo": _DEBUG.replace(hidden_size=128, intermediate_size=512),
    # Small from-scratch model for the resolution study and the GPU loss-parity run (~88 M parameters with
    # the tiny tokenizer's vocabulary): the 8B's layout (qk-LayerNorm, partial rotary, relu²) at 1/5 width.
    "study": _DEBUG.replace(
        hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, max_position_embeddings=16_384
    ),
}


def flavour_config(name: str, **overrides: Any) -> FuyuModelConfig:
    if name not in FLAVOURS:
        raise ValueError(f"unknown model flavour {name!r}; choose one of {sorted(FLAVOURS)}")
    return FLAVOURS[name].replace(**overrides) if overrides else FLAVOURS[name]


def config_for_tokenizer(cfg: FuyuModelConfig, tokenizer: Any, pad_to: int = 64) -> FuyuModelConfig:
    """Take the special ids from `tokenizer` (HF-style) and grow the vocabulary to cover it (padded)."""
    image_id = tokenizer.convert_tokens_to_ids("|SPEAKER|")
    if image_id is None or image_id == getattr(tokenizer, "unk_token_id", -1):
        raise ValueError("tokenizer has no |SPEAKER| token: it is not a Fuyu tokenizer")
    size = len(tokenizer)
    vocab = max(cfg.vocab_size, -(-size // pad_to) * pad_to)
    changes: dict[str, Any] = {"vocab_size": vocab, "image_token_id": image_id}
    if tokenizer.bos_token_id is not None:
        changes["bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        changes["eos_token_id"] = tokenizer.eos_token_id
    return cfg.replace(**changes)
