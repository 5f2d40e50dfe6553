"""The model's `lean_step` switch (issue 11 item 7): same loss and gradients as the previous path, no host sync.

The fast path merges image patches by index and defers/compiles the LM head's gradient; the reference is the
same model with `lean_step=False` (masked_scatter merge, forward-time weight gradient, plain softmax math)."""

from __future__ import annotations

import pytest
import torch

from otterhd_ray.models.fuyu import PackedBatch, flavour_config, new_model

CFG = flavour_config("debug")
IMG = CFG.image_token_id


def sample(rows: int, cols: int, num_text: int, seed: int, num_targets: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(([IMG] * cols + [IMG + 1]) * rows + [1] + torch.randint(3, IMG, (num_text,), generator=g).tolist())
    patches = torch.randint(0, 256, (rows * cols, CFG.patch_dim), dtype=torch.uint8, generator=g)
    targets = torch.full_like(ids, -100)
    targets[-num_targets - 1 : -1] = ids[-num_targets:]
    return ids, patches, targets


def pack(samples) -> PackedBatch:
    lengths = [len(s[0]) for s in samples]
    target_ids = torch.cat([s[2] for s in samples])
    return PackedBatch(
        input_ids=torch.cat([s[0] for s in samples]),
        target_ids=target_ids,
        position_ids=torch.cat([torch.arange(n) for n in lengths]),
        cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
        max_seqlen=max(lengths),
        patches=torch.cat([s[1] for s in samples]),
        num_target_tokens=int((target_ids != -100).sum()),
    )


SAMPLES = [sample(2, 3, 6, 0), sample(0, 0, 8, 1), sample(3, 2, 5, 2, num_targets=5), sample(1, 1, 1, 3, 1)]


def loss_and_grads(model, batch, scale: float = 0.37):
    loss_sum, num = model.loss(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    # A scale other than 1 checks that the deferred weight gradient applies the incoming gradient.
    return loss_sum.detach(), torch.autograd.grad(loss_sum * scale / num, params)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fused_ops", ["none", "compile"])
@pytest.mark.parametrize("chunk", [2, 2048])
def test_lean_step_equals_previous_path(fused_ops, chunk):
    torch.manual_seed(0)
    model = new_model(CFG, attention="eager", fused_ops=fused_ops, loss_chunk_size=chunk).train()
    for batch in (pack(SAMPLES), pack(SAMPLES[1:2])):  # with images, and text only (no patch rows)
        ref_loss, ref_grads = loss_and_grads(model, batch)
        model.set_switches(lean_step=True)
        loss, grads = loss_and_grads(model, batch)
        model.set_switches(lean_step=False)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_lean_embed_is_exactly_the_masked_scatter_merge():
    torch.manual_seed(0)
    model = new_model(CFG, attention="eager")
    batch = pack(SAMPLES)
    with torch.no_grad():
        ref = model.embed(batch.input_ids, batch.patches)
        model.set_switches(lean_step=True)
        out = model.embed(batch.input_ids, batch.patches)
    assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="image patches"):
        model.embed(batch.input_ids, batch.patches[:-1])


SYNC_OPS = ("aten::masked_select", "aten::nonzero", "aten::item", "aten::_local_scalar_dense")


def host_syncs_of_a_step(model, batch) -> list[str]:
    """The ops of one loss + backward that copy a device value to the host (a sync on CUDA)."""
    from torch.profiler import profile

    with profile() as prof:
        loss_sum, num = model.loss(batch)
        (loss_sum / num).backward()
    model.zero_grad(set_to_none=True)
    out = []
    for event in prof.events():
        parent = event.cpu_parent
        # On CPU `_assert_async` reads its flag with `item`; on CUDA it is a device-side assert (no sync).
        if event.name in SYNC_OPS and not (parent is not None and parent.name in ("aten::_assert_async", "aten::item")):
            out.append(event.name)
    return out


def test_lean_step_has_no_host_sync_op():
    """`masked_select`/`nonzero`/`item` copy a device result to the host: on CUDA each one stalls the launch queue
    until the GPU has caught up. The previous path has one per micro-batch (masked_scatter's backward runs
    masked_select); the lean one has none. (The sdpa backend's per-sample loop reads `cu_seqlens` with `tolist`,
    which is no aten op; GPU runs use varlen, and tests/gpu checks the whole step under CUDA's sync debug mode.)"""
    torch.manual_seed(0)
    model = new_model(CFG, attention="sdpa").train()
    batch = pack(SAMPLES)
    assert "aten::masked_select" in host_syncs_of_a_step(model, batch)
    model.set_switches(lean_step=True)
    assert host_syncs_of_a_step(model, batch) == []
