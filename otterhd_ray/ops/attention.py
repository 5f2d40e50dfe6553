"""Document-causal attention over packed rows, behind one switch.

Backends (all compute causal attention restricted to each sample of the packed row given by `cu_seqlens`):
- `flash`:  flash-attn's `flash_attn_varlen_func` (CUDA, when the package is installed);
- `varlen`: torch's own FlashAttention varlen kernel, `torch.nn.attention.varlen.varlen_attn` (CUDA);
- `flex`:   `flex_attention` with a document-causal block mask (compiled on CUDA);
- `sdpa`:   `scaled_dot_product_attention(is_causal=True)` once per sample (any device; a Python loop);
- `eager`:  the reference — explicit matmul + float32 softmax per sample, like transformers' eager Persimmon.

Optional packages are imported lazily here and nowhere else. `resolve_attention` is called once when the model
is built; it checks the hardware and fails with a message that says what to choose instead.

Legend: T packed tokens, H heads, K head dim, S samples, B batch, Q query length, L cache length.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("flash", "varlen", "flex", "sdpa", "eager")


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _has_varlen_attn() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _has_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device` in this environment (what the backend-parity tests iterate)."""
    device = torch.device(device)
    out = []
    if device.type == "cuda" and _has_flash_attn():
        out.append("flash")
    if device.type == "cuda" and _has_varlen_attn():
        out.append("varlen")
    if _has_flex():
        out.append("flex")
    out += ["sdpa", "eager"]
    return out


# FlashAttention kernels (flash-attn, torch's varlen_attn) take only half-precision inputs.
_HALF_ONLY = ("flash", "varlen")


def resolve_attention(name: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str:
    """Turn a configured name (`auto` included) into a backend that runs on `device` in `dtype`, or raise."""
    device = torch.device(device)
    half = dtype in (torch.float16, torch.bfloat16)
    if name in _HALF_ONLY and not half:
        raise ValueError(f"attention backend {name!r} needs bf16/fp16 weights, got {dtype}; use 'sdpa' or 'flex'")
    if name == "auto":
        if device.type == "cuda" and half:
            for candidate in ("flash", "varlen", "flex"):
                if candidate in available_backends(device):
                    return candidate
        # On CPU (and for float32 on GPU) the per-sample SDPA loop: flex is uncompiled on CPU and has no CPU
        # backward; the FlashAttention kernels refuse float32.
        return "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name in available_backends(device):
        return name
    reasons = {
        "flash": "needs a CUDA device and the flash-attn package (pip install flash-attn)",
        "varlen": "needs a CUDA device and torch >= 2.10 (torch.nn.attention.varlen.varlen_attn)",
        "flex": "needs torch.nn.attention.flex_attention (torch >= 2.5)",
    }
    raise ValueError(
        f"attention backend {name!r} is not available on {device.type}: {reasons.get(name, '')}; "
        f"available here: {', '.join(available_backends(device))}"
    )


def _boundaries(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    # One host sync: the looping backends need Python ints for slicing.
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _eager(q_THK, k_THK, v_THK, cu_seqlens, max_seqlen, scale):
    out = torch.empty_like(q_THK)
    for s, e in _boundaries(cu_seqlens):
        q, k, v = (x[s:e].transpose(0, 1) for x in (q_THK, k_THK, v_THK))  # [H, n, K]
        scores = torch.matmul(q, k.transpose(1, 2)) * scale
        n = e - s
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out[s:e] = torch.matmul(probs, v).transpose(0, 1)
    return out


def _sdpa(q_THK, k_THK, v_THK, cu_seqlens, max_seqlen, scale):
    outs = []
    for s, e in _boundaries(cu_seqlens):
        q, k, v = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q_THK, k_THK, v_THK))  # [1, H, n, K]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def _varlen(q_THK, k_THK, v_THK, cu_seqlens, max_seqlen, scale):
    from torch.nn.attention.varlen import varlen_attn

    # window_size=(-1, 0): unlimited left context, none to the right, i.e. causal within each sample.
    return varlen_attn(
        q_THK, k_THK, v_THK, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, window_size=(-1, 0)
    )


def _flash(q_THK, k_THK, v_THK, cu_seqlens, max_seqlen, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q_THK, k_THK, v_THK, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True
    )


_flex_compiled: Callable | None = None


def _flex(q_THK, k_THK, v_THK, cu_seqlens, max_seqlen, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_compiled
    T = q_THK.shape[0]
    # Sample index of every token: document-causal = same sample and not in the future.
    positions = torch.arange(T, device=q_THK.device)
    doc_T = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)

    def doc_causal(b, h, q_idx, kv_idx):
        return (doc_T[q_idx] == doc_T[kv_idx]) & (q_idx >= kv_idx)

    on_cuda = q_THK.is_cuda
    block_mask = create_block_mask(doc_causal, None, None, T, T, device=q_THK.device, _compile=on_cuda)
    fn = flex_attention
    if on_cuda:
        # The un-compiled flex path materialises the scores; compiled it is a fused Triton kernel.
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=True)
        fn = _flex_compiled
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q_THK, k_THK, v_THK))  # [1, H, T, K]
    out = fn(q, k, v, block_mask=block_mask, scale=scale)
    return out[0].transpose(0, 1)


_IMPLS = {"eager": _eager, "sdpa": _sdpa, "varlen": _varlen, "flash": _flash, "flex": _flex}


def packed_attention(
    q_THK: torch.Tensor,
    k_THK: torch.Tensor,
    v_THK: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    backend: str,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention within each sample of a packed row -> [T, H, K]. `backend` must be resolved already."""
    if scale is None:
        scale = 1.0 / math.sqrt(q_THK.shape[-1])
    return _IMPLS[backend](q_THK, k_THK, v_THK, cu_seqlens, max_seqlen, scale)


def cached_attention(
    q_BHQK: torch.Tensor,
    k_BHLK: torch.Tensor,
    v_BHLK: torch.Tensor,
    mask_BQL: torch.Tensor,
    scale: float | None = None,
    eager: bool = False,
) -> torch.Tensor:
    """Decoding attention over a KV cache with a boolean `mask_BQL` (True = may attend) -> [B, H, Q, K]."""
    if scale is None:
        scale = 1.0 / math.sqrt(q_BHQK.shape[-1])
    mask = mask_BQL[:, None]
    if not eager:
        return F.scaled_dot_product_attention(q_BHQK, k_BHLK, v_BHLK, attn_mask=mask, scale=scale)
    scores = torch.matmul(q_BHQK, k_BHLK.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_BHQK.dtype)
    return torch.matmul(probs, v_BHLK)
