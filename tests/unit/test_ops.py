"""ops/: every attention backend against the eager reference, fused glue against plain ops, chunked CE."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from otterhd_ray.models.fuyu import IGNORE_INDEX
from otterhd_ray.ops import attention, fused, loss

torch.manual_seed(0)


def packed_qkv(lengths, H=4, K=16, dtype=torch.float32, grad=False):
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, K, dtype=dtype, requires_grad=grad) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, max(lengths)


@pytest.mark.parametrize("backend", [b for b in attention.available_backends("cpu") if b != "eager"])
def test_backends_equal_eager_forward_and_backward(backend):
    lengths = [5, 1, 12, 7]
    q, k, v, cu, mx = packed_qkv(lengths, grad=True)
    ref = attention.packed_attention(q, k, v, cu, mx, "eager")
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    if backend == "flex":  # torch has no flex_attention backward on CPU: compare the forward only
        out = attention.packed_attention(q.detach(), k.detach(), v.detach(), cu, mx, backend)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
        return
    out = attention.packed_attention(q, k, v, cu, mx, backend)
    grads = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_eager_is_causal_within_each_sample_only():
    q, k, v, cu, mx = packed_qkv([4, 6])
    out = attention.packed_attention(q, k, v, cu, mx, "eager")
    # sample 2 alone gives the same result: nothing leaks across the boundary
    alone = attention.packed_attention(q[4:], k[4:], v[4:], torch.tensor([0, 6], dtype=torch.int32), 6, "eager")
    torch.testing.assert_close(out[4:], alone)
    # changing a future token of a sample does not change earlier outputs
    k2 = k.clone()
    k2[9] += 1
    out2 = attention.packed_attention(q, k2, v, cu, mx, "eager")
    torch.testing.assert_close(out2[:9], out[:9])
    assert not torch.allclose(out2[9], out[9])


def test_resolve_attention_errors_and_auto():
    assert attention.resolve_attention("auto", "cpu") == "sdpa"
    for name in ("varlen", "flash"):
        with pytest.raises(ValueError, match="not available on cpu"):
            attention.resolve_attention(name, "cpu")
    with pytest.raises(ValueError, match="bf16"):  # FlashAttention kernels refuse float32 anywhere
        attention.resolve_attention("varlen", "cuda", torch.float32)
    assert attention.resolve_attention("auto", "cuda", torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.resolve_attention("xformers", "cpu")


def test_cached_attention_eager_equals_sdpa():
    q = torch.randn(2, 4, 1, 8)
    k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)[:, None]
    torch.testing.assert_close(
        attention.cached_attention(q, k, v, mask), attention.cached_attention(q, k, v, mask, eager=True)
    )


# ----------------------------------------------------------------------------------------------- fused
def test_partial_rotary_matches_transformers():
    from transformers.models.persimmon.modeling_persimmon import apply_rotary_pos_emb

    T, H, K, R = 7, 2, 16, 8
    q, k = torch.randn(T, H, K), torch.randn(T, H, K)
    pos = torch.arange(T)
    cos, sin = fused.rotary_cos_sin(pos, R, 25_000.0, torch.float32)
    ref_q, ref_k = apply_rotary_pos_emb(q[..., :R].transpose(0, 1)[None], k[..., :R].transpose(0, 1)[None], cos[None], sin[None])
    ours_q, ours_k = fused.partial_rotary(q, cos, sin), fused.partial_rotary(k, cos, sin)
    torch.testing.assert_close(ours_q[..., :R], ref_q[0].transpose(0, 1))
    torch.testing.assert_close(ours_k[..., :R], ref_k[0].transpose(0, 1))
    torch.testing.assert_close(ours_q[..., R:], q[..., R:])


def test_relu2_and_layer_norm_reference():
    x = torch.randn(5, 8)
    torch.testing.assert_close(fused.relu2(x), torch.relu(x) ** 2)
    w, b = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(fused.layer_norm(x, w, b, 1e-5), torch.nn.LayerNorm(8)(x) * w + b, rtol=1e-5, atol=1e-5)


def layer_weights(D=32, H=4, F_=64, grad=True):
    K = D // H

    def p(*shape, scale=0.1, base=0.0):
        return (base + scale * torch.randn(*shape)).requires_grad_(grad)

    return fused.LayerWeights(
        ln1_w=p(D, base=1.0), ln1_b=p(D), qkv=fused.Projection(p(3 * D, D), p(3 * D)), qn_w=p(K, base=1.0),
        qn_b=p(K), kn_w=p(K, base=1.0), kn_b=p(K), dense=fused.Projection(p(D, D), p(D)), ln2_w=p(D, base=1.0),
        ln2_b=p(D), up=fused.Projection(p(F_, D), p(F_)), down=fused.Projection(p(D, F_), p(D)),
    )


def tensors_of(w):
    """Every tensor of a LayerWeights (projections flattened)."""
    out = []
    for value in vars(w).values():
        items = value if isinstance(value, tuple) else (value,)  # projections also carry LoRA scale/dropout floats
        out += [t for t in items if isinstance(t, torch.Tensor)]
    return out


@pytest.mark.timeout(240)
def test_compiled_glue_equals_reference_forward_and_backward():
    ref_ops = fused.resolve_fused_ops("none", "cpu")
    comp_ops = fused.resolve_fused_ops("compile", "cpu")
    w = layer_weights()
    params = tensors_of(w)
    cos, sin = fused.rotary_cos_sin(torch.arange(9), 4, 25_000.0, torch.float32)

    def run(ops, x):
        q, k, v = ops.attn_in(x, w, cos, sin, 4, 1e-5)
        o = (q + k * v).sum(0, keepdim=True).expand_as(q) * 0.1  # any function of q, k, v
        return ops.attn_out(x, o, w, 1e-5)

    x = torch.randn(9, 32, requires_grad=True)
    ref = run(ref_ops, x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *params])
    out = run(comp_ops, x)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_mode_errors():
    with pytest.raises(ValueError, match="CUDA"):
        fused.resolve_fused_ops("liger", "cpu")
    with pytest.raises(ValueError, match="unknown fused_ops"):
        fused.resolve_fused_ops("apex", "cpu")
    assert fused.resolve_fused_ops("auto", "cpu").mode == "none"


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("chunk", [1, 3, 16, 1000])
def test_chunked_cross_entropy_equals_reference(chunk):
    N, D, V = 16, 8, 50
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[[2, 7]] = IGNORE_INDEX
    ref = loss.reference_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref * 0.5, (h, w))
    out = loss.linear_cross_entropy(h, w, t, chunk_size=chunk, ignore_index=IGNORE_INDEX)
    grads = torch.autograd.grad(out * 0.5, (h, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out, F.cross_entropy(h @ w.T, t, reduction="sum"))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_chunked_cross_entropy_bf16_close_to_fp32_reference():
    N, D, V = 40, 16, 300
    h = torch.randn(N, D)
    w = torch.randn(V, D) * 0.2
    t = torch.randint(0, V, (N,))
    ref = loss.reference_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX)
    out = loss.linear_cross_entropy(h.bfloat16(), w.bfloat16(), t, chunk_size=7, ignore_index=IGNORE_INDEX)
    assert abs(out.item() - ref.item()) < 0.01 * abs(ref.item())


@pytest.mark.parametrize("deferred", [False, True])
def test_cross_entropy_under_autocast_equals_the_autocast_reference(deferred):
    # fp32 weights under bf16 autocast (the resolution study, HF Trainer's bf16=True): the autograd Function's own
    # matmuls and in-place accumulation are outside autocast's reach, so the loss casts as autocast would.
    N, D, V = 12, 16, 40
    h = torch.randn(N, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.2).requires_grad_()
    t = torch.randint(0, V, (N,))
    t[3] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss.reference_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX)
        out = loss.linear_cross_entropy(h, w, t, chunk_size=5 if not deferred else 16, ignore_index=IGNORE_INDEX,
                                        defer_weight_grad=deferred)
    ref_grads = torch.autograd.grad(ref, (h, w))
    grads = torch.autograd.grad(out, (h, w))
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # the same bf16 logits, float32 CE
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # bf16 gradient matmuls in both


def test_chunked_cross_entropy_edge_cases():
    h, w = torch.randn(0, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    ce = functools.partial(loss.linear_cross_entropy, ignore_index=IGNORE_INDEX)
    out = ce(h, w, torch.zeros(0, dtype=torch.long))
    out.backward()
    assert out.item() == 0.0 and w.grad is not None
    with pytest.raises(ValueError):
        ce(torch.randn(3, 4), w, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        ce(torch.randn(3, 4), w, torch.zeros(3, dtype=torch.long), chunk_size=0)
    with torch.no_grad():  # no gradient buffers without grad
        assert ce(torch.randn(3, 4), w, torch.zeros(3, dtype=torch.long)).item() > 0


# ------------------------------------------------------------------------------- loss: small micro-batches
def ce_case(N=12, D=16, V=60, dtype=torch.float32):
    h = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, D) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,))
    t[[1, 5]] = IGNORE_INDEX
    return h, w, t


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_grad_fused_and_compiled_equal_reference(dtype):
    compiled = fused.resolve_fused_ops("compile", "cpu").softmax_grad
    for N in (7, 12, 5):  # the row count changes every micro-batch: one dynamic graph
        logits = (torch.randn(N, 50) * 3).to(dtype)
        t = torch.randint(0, 50, (N,))
        t[0] = IGNORE_INDEX
        ref_loss, ref_g = loss.softmax_grad_reference(logits, t, IGNORE_INDEX)
        torch.testing.assert_close(ref_loss, F.cross_entropy(logits.float(), t, reduction="sum"))
        for fn in (loss.softmax_grad_fused, compiled):
            out_loss, g = fn(logits, t, IGNORE_INDEX)
            assert g.dtype == dtype and out_loss.dtype == torch.float32
            torch.testing.assert_close(out_loss, ref_loss)
            torch.testing.assert_close(g, ref_g)
        assert torch.all(ref_g[0] == 0)  # an ignored row has no gradient


@pytest.mark.parametrize("softmax_grad", [loss.softmax_grad_reference, loss.softmax_grad_fused])
@pytest.mark.parametrize("chunk,deferred", [(4, False), (12, True), (100, True)])
def test_deferred_weight_grad_equals_reference(softmax_grad, chunk, deferred):
    h, w, t = ce_case()
    ref = loss.reference_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref * 0.37, (h, w))
    out = loss.linear_cross_entropy(
        h, w, t, chunk, ignore_index=IGNORE_INDEX, softmax_grad=softmax_grad, defer_weight_grad=True
    )
    # Deferred only when every row fits one chunk (and no more rows than hidden units: see the next test).
    assert ("Deferred" in type(out.grad_fn).__name__) == deferred
    grads = torch.autograd.grad(out * 0.37, (h, w))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_deferred_weight_grad_only_where_it_saves_memory():
    ce = functools.partial(loss.linear_cross_entropy, ignore_index=IGNORE_INDEX, defer_weight_grad=True)
    h, w, t = ce_case(N=20, D=16)  # more rows than hidden units: g [N, V] would outweigh the [V, D] gradient
    assert "Deferred" not in type(ce(h, w, t, 4096).grad_fn).__name__
    h, w, t = ce_case()
    assert "Deferred" not in type(ce(h, w.detach(), t, 4096).grad_fn).__name__  # frozen head (LoRA): nothing to defer
    h2 = h.detach().requires_grad_(False)
    out = ce(h2, w, t, 4096)  # gradient for the head only
    (grad_w,) = torch.autograd.grad(out, (w,))
    torch.testing.assert_close(grad_w, torch.autograd.grad(loss.reference_cross_entropy(h2, w, t, ignore_index=IGNORE_INDEX), (w,))[0])


def test_deferred_weight_grad_bf16_close_to_previous_path():
    h, w, t = ce_case(N=40, D=64, V=300, dtype=torch.bfloat16)
    ce = functools.partial(loss.linear_cross_entropy, ignore_index=IGNORE_INDEX, chunk_size=64)
    ref_grads = torch.autograd.grad(ce(h, w, t) / 38, (h, w))
    grads = torch.autograd.grad(ce(h, w, t, softmax_grad=loss.softmax_grad_fused, defer_weight_grad=True) / 38, (h, w))
    for a, b in zip(grads, ref_grads, strict=True):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
