"""The element-wise glue of a Persimmon layer, as a reference and as fused variants behind one switch.

A layer is two glue regions around the attention kernel:
- `attn_in`:  LayerNorm -> fused QKV linear -> per-head qk-LayerNorm -> partial rotary  => q, k, v [T, H, K];
- `attn_out`: dense projection + residual -> LayerNorm -> relu² MLP + residual          => x [T, D].

Modes (`ModelConfig.fused_ops`):
- `none`:    plain PyTorch ops (the reference, numerically what transformers computes);
- `compile`: the same functions under `torch.compile` with the token dimension dynamic; Inductor fuses
             LayerNorm, qk-norm, the rotary and relu² into few kernels around the matmuls (one graph for every
             packed length);
- `liger`/`triton`: Liger-Kernel's Triton LayerNorm for the block and qk norms (imported lazily; GPU only).
`compile` also compiles the loss's per-chunk softmax/gradient math (`ops.loss.softmax_grad_fused`), which the
model uses when its `lean_step` switch is on.
`auto` is `compile` on CUDA and `none` on CPU. The parameters and the checkpoint layout are the same in every
mode; the test suite compares each mode with the reference.

Legend: T tokens, D hidden, H heads, K head dim, R rotary dims, F MLP width.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from otterhd_ray.ops.loss import SoftmaxGrad, softmax_grad_fused, softmax_grad_reference

MODES = ("none", "compile", "liger", "triton")


# ------------------------------------------------------------------------------------------- reference ops
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def partial_rotary(x_THK: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on the first R dims of each head; the rest pass through (Persimmon)."""
    R = cos_TR.shape[-1]
    x_rot, x_pass = x_THK[..., :R], x_THK[..., R:]
    cos, sin = cos_TR[:, None, :], sin_TR[:, None, :]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def rotary_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [.., R] for the given positions: computed in float32 then cast, exactly as transformers does."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=position_ids.device).float() / rotary_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Projection(NamedTuple):
    """The tensors of one linear projection (`y = x W^T + b`), as the glue functions receive them, with the
    factors of its LoRA adapter when it has one (models/fuyu/lora.py; `lora_A` None: no adapter or merged)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_A: torch.Tensor | None = None  # [R, in]
    lora_B: torch.Tensor | None = None  # [out, R]
    lora_scale: float = 1.0
    lora_dropout: float = 0.0  # applied to the adapter's input while training only


def project(x: torch.Tensor, p: Projection, training: bool = False) -> torch.Tensor:
    """Every projection of the model is computed here (the QKV, dense and MLP matmuls inside the glue, the patch
    embedding and the LM head outside it): the one place where a low-rank adapter adds its update,
    x W^T + b + (dropout(x) A^T) B^T * scale, as two thin matmuls (W + B A scale is never materialised)."""
    y = F.linear(x, p.weight, p.bias)
    if p.lora_A is None:
        return y
    if p.lora_dropout > 0.0 and training:
        x = F.dropout(x, p.lora_dropout, training=True)
    return y + F.linear(F.linear(x, p.lora_A), p.lora_B) * p.lora_scale


@dataclass
class LayerWeights:
    """The tensors of one decoder layer, passed explicitly so the glue functions are pure (compilable)."""

    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    qkv: Projection
    qn_w: torch.Tensor | None
    qn_b: torch.Tensor | None
    kn_w: torch.Tensor | None
    kn_b: torch.Tensor | None
    dense: Projection
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    up: Projection
    down: Projection
    training: bool = False  # adapter dropout is active only while training


def attn_in(
    x_TD: torch.Tensor,
    w: LayerWeights,
    cos_TR: torch.Tensor,
    sin_TR: torch.Tensor,
    num_heads: int,
    eps: float,
    norm: Callable = layer_norm,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h_TD = norm(x_TD, w.ln1_w, w.ln1_b, eps)
    qkv = project(h_TD, w.qkv, w.training)
    # HF lays the fused projection out per head as [q, k, v] (view(T, H, 3, K)), not [all q, all k, all v].
    qkv_TH3K = qkv.view(qkv.shape[0], num_heads, 3, -1)
    q, k, v = qkv_TH3K[:, :, 0], qkv_TH3K[:, :, 1], qkv_TH3K[:, :, 2]
    if w.qn_w is not None:
        q = norm(q, w.qn_w, w.qn_b, eps)
        k = norm(k, w.kn_w, w.kn_b, eps)
    q = partial_rotary(q, cos_TR, sin_TR)
    k = partial_rotary(k, cos_TR, sin_TR)
    # Attention kernels want contiguous [T, H, K]; v is a strided view of qkv.
    return q.contiguous(), k.contiguous(), v.contiguous()


def attn_out(
    x_TD: torch.Tensor, o_THK: torch.Tensor, w: LayerWeights, eps: float, norm: Callable = layer_norm
) -> torch.Tensor:
    x_TD = x_TD + project(o_THK.reshape(o_THK.shape[0], -1), w.dense, w.training)
    h_TD = norm(x_TD, w.ln2_w, w.ln2_b, eps)
    return x_TD + project(relu2(project(h_TD, w.up, w.training)), w.down, w.training)


# ------------------------------------------------------------------------------------------------ modes
@dataclass
class FusedOps:
    """The resolved implementation of each glue region (chosen once per model)."""

    mode: str
    attn_in: Callable
    attn_out: Callable
    layer_norm: Callable
    softmax_grad: SoftmaxGrad = softmax_grad_reference  # the loss's per-chunk math (ops/loss.py)


def _liger_layer_norm() -> Callable:
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        return LigerLayerNormFunction.apply(x.reshape(-1, shape[-1]), weight, bias, eps).view(shape)

    return norm


def _token_dynamic(fn: Callable) -> Callable:
    """torch.compile `fn` with only the token dimension symbolic.

    Packed rows change length every step, so dim 0 of every tensor argument is marked dynamic (one graph for
    all lengths); hidden, head and vocabulary sizes stay static so Inductor specialises its kernels for them.
    """
    compiled = torch.compile(fn)

    def run(*args, **kwargs):
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(*args, **kwargs)

    return run


def _rows_dynamic(fn: SoftmaxGrad) -> SoftmaxGrad:
    """torch.compile the loss's per-chunk math with the row count symbolic (it changes every micro-batch)."""
    compiled = torch.compile(fn)

    def run(logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int):
        torch._dynamo.maybe_mark_dynamic(logits_NV, 0)
        torch._dynamo.maybe_mark_dynamic(targets_N, 0)
        return compiled(logits_NV, targets_N, ignore_index)

    return run


def resolve_fused_ops(mode: str, device: torch.device | str) -> FusedOps:
    """Turn `ModelConfig.fused_ops` into callables for `device`, or raise ValueError naming the fix."""
    device = torch.device(device)
    if mode == "auto":
        mode = "compile" if device.type == "cuda" else "none"
    if mode == "none":
        return FusedOps("none", attn_in, attn_out, layer_norm)
    if mode == "compile":
        return FusedOps(
            "compile", _token_dynamic(attn_in), _token_dynamic(attn_out), _token_dynamic(layer_norm),
            _rows_dynamic(softmax_grad_fused),
        )
    if mode in ("liger", "triton"):
        if device.type != "cuda":
            raise ValueError(f"fused_ops={mode!r} runs Triton kernels and needs a CUDA device; use 'compile' or 'none'")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ValueError(f"fused_ops={mode!r} needs the liger-kernel package (pip install liger-kernel)")
        norm = _liger_layer_norm()

        def liger_in(x, w, cos, sin, num_heads, eps):
            return attn_in(x, w, cos, sin, num_heads, eps, norm=norm)

        def liger_out(x, o, w, eps):
            return attn_out(x, o, w, eps, norm=norm)

        return FusedOps(mode, liger_in, liger_out, norm)
    raise ValueError(f"unknown fused_ops mode {mode!r}; choose one of auto, {', '.join(MODES)}")
