"""GPU checks of LoRA in the fused model: compiled glue and checkpointing == the plain path in bf16 (loss and
adapter gradients), and our adapted logits == peft's on transformers' Fuyu in bf16."""

from __future__ import annotations

import pytest
import torch

from otterhd_ray.models.fuyu import PackedBatch, new_model, normalize_patches, save_hf
from otterhd_ray.models.fuyu.lora import TARGETS, LoraSpec, adapters, add_lora
from otterhd_ray.models.fuyu.peft import save_peft_adapter
from tests.helpers import rel_err, wide_debug_config

pytestmark = pytest.mark.gpu
DEV = torch.device("cuda")
CFG = wide_debug_config()
IMG = CFG.image_token_id


def packed(seed: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.tensor(([IMG] * c + [IMG + 1]) * r + [1] + torch.randint(3, IMG, (n,), generator=g).tolist())
            for r, c, n in ((4, 6, 40), (3, 5, 90))]
    ids = torch.cat(rows)
    targets = torch.cat([torch.cat([r[1:], torch.tensor([-100])]) for r in rows])
    targets[ids == IMG] = -100
    lengths = [len(r) for r in rows]
    return PackedBatch(
        input_ids=ids, target_ids=targets, position_ids=torch.cat([torch.arange(n) for n in lengths]),
        cu_seqlens=torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32), max_seqlen=max(lengths),
        patches=torch.randint(0, 256, (int((ids == IMG).sum()), CFG.patch_dim), dtype=torch.uint8, generator=g),
        num_target_tokens=int((targets != -100).sum()),
    ).to(DEV)


def lora_model(**switches):
    torch.manual_seed(0)
    model = new_model(CFG, dtype=torch.bfloat16, device=DEV, **switches)
    add_lora(model, LoraSpec(r=8, alpha=16, dropout=0.0, targets=TARGETS))
    g = torch.Generator(device=DEV).manual_seed(1)
    with torch.no_grad():
        for _, a in adapters(model):
            a.B.copy_(torch.randn(a.B.shape, generator=g, device=DEV) * 0.05)
    return model.train()


def loss_and_grads(model, b):
    loss, _ = model.loss(b)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("switch", [{"fused_ops": "compile"}, {"fused_ops": "compile", "activation_checkpointing": "selective"},
                                    {"activation_checkpointing": "full"}])
def test_fused_lora_equals_plain_in_bf16(switch):
    b = packed()
    ref_loss, ref = loss_and_grads(lora_model(fused_ops="none"), b)
    loss, got = loss_and_grads(lora_model(**switch), b)
    assert rel_err(loss, ref_loss) < 1e-2
    for name in ref:
        assert rel_err(got[name], ref[name]) < 3e-2, name


def test_adapter_logits_equal_peft_in_bf16(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = lora_model(fused_ops="compile").eval()
    save_hf(model, tmp_path / "base", base_only=True)
    save_peft_adapter(model, tmp_path / "adapter")
    hf = transformers.FuyuForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16,
                                                      attn_implementation="sdpa").to(DEV)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", autocast_adapter_dtype=False).eval()
    b = packed()
    n = int(b.cu_seqlens[1])
    ids, patches = b.input_ids[:n], b.patches[: int((b.input_ids[:n] == IMG).sum())]
    with torch.no_grad():
        ref = theirs(input_ids=ids[None], image_patches=normalize_patches(patches)[None].to(torch.bfloat16)).logits[0]
        cu = torch.tensor([0, n], dtype=torch.int32, device=DEV)
        ours = model.logits(model(ids, patches, torch.arange(n, device=DEV), cu, n))
    assert rel_err(ours, ref) < 2e-2
