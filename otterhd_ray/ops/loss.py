"""Cross-entropy of the LM head on supervised positions only, without materialising the full logits.

`linear_cross_entropy(h_ND, weight_VD, targets_N, chunk_size, ignore_index=...)` returns the *sum* of the token
losses. It computes `chunk_size` rows of logits at a time and, when gradients are needed, their gradients in the
same pass (the softmax minus the one-hot), so neither forward nor backward ever holds more than `chunk_size x V`
logits and the logits matmul is never recomputed. The reference is `F.cross_entropy(h @ W.T, t, reduction="sum")` with
float32 logits, which is what transformers' loss does. Rows whose target is `ignore_index` count zero; the value is
the model's (`otterhd_ray.models.fuyu.IGNORE_INDEX`), passed in because ops sit below the models.

Legend: N supervised rows, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_cross_entropy(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, *, ignore_index: int
) -> torch.Tensor:
    logits = F.linear(h_ND, weight_VD).float()
    return F.cross_entropy(logits, targets_N, ignore_index=ignore_index, reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, chunk_size, ignore_index):
        N = h_ND.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        grad_h = torch.empty_like(h_ND) if need_h else None
        # The weight gradient accumulates in place in the weight's dtype: a float32 copy of a 262k x 4096 head
        # would cost 4 GiB, and each chunk's matmul already accumulates in float32 inside the kernel.
        grad_w = torch.zeros_like(weight_VD) if need_w else None
        for start in range(0, N, chunk_size):
            h = h_ND[start : start + chunk_size]
            t = targets_N[start : start + chunk_size]
            logits = F.linear(h, weight_VD).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = t != ignore_index
            t_safe = torch.where(valid, t, 0)
            picked = logits.gather(1, t_safe[:, None])[:, 0]
            loss += torch.where(valid, lse - picked, 0.0).sum()
            if need_h or need_w:
                # d loss / d logits = softmax - onehot (rows with ignored targets contribute nothing).
                g = torch.exp(logits.sub_(lse[:, None]))
                g.scatter_add_(1, t_safe[:, None], torch.full_like(lse[:, None], -1.0))
                g.mul_(valid[:, None])
                g = g.to(h.dtype)
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
        )


def linear_cross_entropy(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, chunk_size: int = 2048, *, ignore_index: int
) -> torch.Tensor:
    """Sum over rows of CE(h @ W.T, target) in float32; rows whose target is `ignore_index` count zero."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if h_ND.shape[0] != targets_N.shape[0]:
        raise ValueError(f"{h_ND.shape[0]} hidden rows but {targets_N.shape[0]} targets")
    if h_ND.shape[0] == 0:
        return (h_ND.sum() + weight_VD.sum()).float() * 0.0
    return _ChunkedLinearCrossEntropy.apply(h_ND, weight_VD, targets_N, chunk_size, ignore_index)
