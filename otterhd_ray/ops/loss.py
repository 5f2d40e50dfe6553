"""Cross-entropy of the LM head on supervised positions only, without materialising the full logits.

`linear_cross_entropy(h_ND, weight_VD, targets_N, chunk_size, ignore_index=...)` returns the *sum* of the token
losses. It computes `chunk_size` rows of logits at a time and, when gradients are needed, their gradients in the
same pass (the softmax minus the one-hot), so neither forward nor backward ever holds more than `chunk_size x V`
logits and the logits matmul is never recomputed. The reference is `F.cross_entropy(h @ W.T, t, reduction="sum")` with
float32 logits, which is what transformers' loss does. Rows whose target is `ignore_index` count zero; the value is
the model's (`otterhd_ray.models.fuyu.IGNORE_INDEX`), passed in because ops sit below the models.

Two options exist for small micro-batches, where vocabulary-sized work per step is not amortised (issue 11):
- `softmax_grad`: the per-chunk softmax/gradient math. `softmax_grad_reference` (plain in-place ops on a float32
  copy of the logits) is the reference; `softmax_grad_fused` is the same math written functionally for
  torch.compile (`ops.fused` compiles it under `fused_ops=compile`), which reads the bf16 logits instead of
  making ~7 float32 passes over them.
- `defer_weight_grad`: when all rows fit in one chunk and there are no more of them than hidden units, keep the
  gradient of the logits g [N, V] (never larger than the [V, D] weight gradient it replaces) and form the
  weight gradient in backward as `g^T (h * grad_loss)`. Without it the forward builds `zeros(V, D)` + `addmm_`
  and the backward multiplies the whole [V, D] gradient by the incoming scalar: two vocabulary-sized
  elementwise passes and a zero fill per micro-batch (~2.5 ms per step for a 262k x 4096 head on an H200,
  measured in run1_baseline/prof_seed.txt). The weight is not used in backward (ZeRO-3 frees it after forward).

Legend: N supervised rows, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SoftmaxGrad = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def reference_cross_entropy(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, *, ignore_index: int
) -> torch.Tensor:
    logits = F.linear(h_ND, weight_VD).float()
    return F.cross_entropy(logits, targets_N, ignore_index=ignore_index, reduction="sum")


def softmax_grad_reference(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the rows' cross-entropies in float32, d sum / d logits in the logits' dtype): in-place float32 ops."""
    logits = logits_NV.float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets_N != ignore_index
    t_safe = torch.where(valid, targets_N, 0)
    picked = logits.gather(1, t_safe[:, None])[:, 0]
    loss = torch.where(valid, lse - picked, 0.0).sum()
    # d loss / d logits = softmax - onehot (rows with ignored targets contribute nothing).
    g = torch.exp(logits.sub_(lse[:, None]))
    g.scatter_add_(1, t_safe[:, None], torch.full_like(lse[:, None], -1.0))
    g.mul_(valid[:, None])
    return loss, g.to(logits_NV.dtype)


def softmax_grad_fused(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax_grad_reference` without in-place ops or a one-hot tensor, so Inductor fuses it into a row
    reduction and one elementwise pass over the logits (eagerly it would materialise [N, V] temporaries)."""
    logits = logits_NV.float()
    lse_N = torch.logsumexp(logits, dim=-1)
    valid_N = targets_N != ignore_index
    t_N = torch.where(valid_N, targets_N, 0)
    picked_N = logits.gather(1, t_N[:, None])[:, 0]
    loss = torch.where(valid_N, lse_N - picked_N, 0.0).sum()
    columns_V = torch.arange(logits.shape[1], device=logits.device)
    onehot = (columns_V[None, :] == t_N[:, None]).to(logits.dtype)
    g = (torch.exp(logits - lse_N[:, None]) - onehot) * valid_N[:, None].to(logits.dtype)
    return loss, g.to(logits_NV.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, chunk_size, ignore_index, softmax_grad):
        N = h_ND.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        grad_h = torch.empty_like(h_ND) if need_h else None
        # The weight gradient accumulates in place in the weight's dtype: a float32 copy of a 262k x 4096 head
        # would cost 4 GiB, and each chunk's matmul already accumulates in float32 inside the kernel.
        grad_w = torch.zeros_like(weight_VD) if need_w else None
        for start in range(0, N, chunk_size):
            h = h_ND[start : start + chunk_size]
            chunk_loss, g = softmax_grad(F.linear(h, weight_VD), targets_N[start : start + chunk_size], ignore_index)
            loss += chunk_loss
            if need_h:
                grad_h[start : start + chunk_size] = g @ weight_VD
            if need_w:
                grad_w.addmm_(g.t(), h)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None,
            None,
            None,
            None,
            None,
        )


class _DeferredLinearCrossEntropy(torch.autograd.Function):
    """One chunk; the weight gradient is formed in backward with the incoming scale on the small operand."""

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, ignore_index, softmax_grad):
        loss, g_NV = softmax_grad(F.linear(h_ND, weight_VD), targets_N, ignore_index)
        # grad_h needs the weight: form it now (under ZeRO-3 the weight is only gathered during forward).
        grad_h = g_NV @ weight_VD if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(h_ND, g_NV, grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h_ND, g_NV, grad_h = ctx.saved_tensors
        scale = grad_loss.to(h_ND.dtype)
        return grad_h * scale if grad_h is not None else None, g_NV.t() @ (h_ND * scale), None, None, None


def linear_cross_entropy(
    h_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    chunk_size: int = 2048,
    *,
    ignore_index: int,
    softmax_grad: SoftmaxGrad = softmax_grad_reference,
    defer_weight_grad: bool = False,
) -> torch.Tensor:
    """Sum over rows of CE(h @ W.T, target) in float32; rows whose target is `ignore_index` count zero.

    `softmax_grad` and `defer_weight_grad` are the small-micro-batch options of the module docstring; both give
    the same values as the defaults up to rounding."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if h_ND.shape[0] != targets_N.shape[0]:
        raise ValueError(f"{h_ND.shape[0]} hidden rows but {targets_N.shape[0]} targets")
    if h_ND.shape[0] == 0:
        return (h_ND.sum() + weight_VD.sum()).float() * 0.0
    device_type = h_ND.device.type
    if torch.is_autocast_enabled(device_type):
        # The autograd Functions below do their own matmuls and in-place accumulation, which autocast does not
        # reach: cast both operands as autocast would for the logits' linear, then run them with autocast off.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(
                h_ND.to(dtype), weight_VD.to(dtype), targets_N, chunk_size, ignore_index=ignore_index,
                softmax_grad=softmax_grad, defer_weight_grad=defer_weight_grad,
            )
    N, D = h_ND.shape
    if defer_weight_grad and torch.is_grad_enabled() and weight_VD.requires_grad and N <= min(chunk_size, D):
        return _DeferredLinearCrossEntropy.apply(h_ND, weight_VD, targets_N, ignore_index, softmax_grad)
    return _ChunkedLinearCrossEntropy.apply(h_ND, weight_VD, targets_N, chunk_size, ignore_index, softmax_grad)
