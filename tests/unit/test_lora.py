"""LoRA on our model: peft's init and scale, frozen base, the fused/reference and checkpointing paths agree,
the LM-head adapter in the chunked loss, merge/unmerge, and one-line errors for adapter/base mismatches."""

from __future__ import annotations

import json
import math

import pytest
import torch

from otterhd_ray.config import ConfigError, FinetuneConfig, load_finetune_config
from otterhd_ray.models.fuyu import PackedBatch, flavour_config, new_model, save_hf
from otterhd_ray.models.fuyu.lora import (
    TARGETS,
    LoraSpec,
    adapter_state_dict,
    adapters,
    add_lora,
    merge,
    unmerge,
)
from otterhd_ray.models.fuyu.peft import apply_lora_config, load_peft_adapter, save_peft_adapter
from otterhd_ray.train.schedule import param_groups

CFG = flavour_config("debug")
IMG, NL = CFG.image_token_id, CFG.image_token_id + 1


def batch(seed: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r, c, n in ((2, 3, 7), (1, 4, 11)):
        rows.append(torch.tensor(([IMG] * c + [NL]) * r + [CFG.bos_token_id] + torch.randint(3, IMG, (n,), generator=g).tolist()))
    ids = torch.cat(rows)
    lengths = [len(r) for r in rows]
    targets = torch.cat([torch.cat([r[1:], torch.tensor([-100])]) for r in rows])
    targets[torch.cat([r == IMG for r in rows])] = -100
    return PackedBatch(
        input_ids=ids, target_ids=targets,
        position_ids=torch.cat([torch.arange(n) for n in lengths]),
        cu_seqlens=torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32),
        max_seqlen=max(lengths),
        patches=torch.randint(0, 256, (int((ids == IMG).sum()), CFG.patch_dim), dtype=torch.uint8, generator=g),
        num_target_tokens=int((targets != -100).sum()),
    )


def lora_model(spec: LoraSpec, seed: int = 0, **switches):
    torch.manual_seed(seed)
    model = new_model(CFG, attention="eager", **switches)
    add_lora(model, spec)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, a in adapters(model):
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.1)
    return model


def grads(model, b) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = model.loss(b)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_peft_init_scale_and_frozen_base():
    torch.manual_seed(0)
    model = new_model(CFG, attention="eager")
    b = batch()
    with torch.no_grad():
        before = model.loss(b)[0]
    add_lora(model, LoraSpec(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():
        assert torch.equal(model.loss(b)[0], before)  # B = 0: a fresh adapter changes nothing
    a = model.layers[0].self_attn.query_key_value.lora
    bound = 1 / math.sqrt(CFG.hidden_size)  # kaiming_uniform(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
    assert a.A.abs().max() <= bound and a.A.std() > bound / 3 and torch.all(a.B == 0)
    assert a.scale == 2.0 and LoraSpec(r=16, alpha=8, rslora=True).scale == 2.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) and len(trainable) == 2 * 4 * CFG.num_layers
    names = [n for g in param_groups(model, 0.1) for n in g["names"]]
    assert sorted(names) == sorted(trainable)  # only adapters reach the optimizer


@pytest.mark.parametrize("switch", [{"activation_checkpointing": "full"}, {"activation_checkpointing": "selective"},
                                    {"activation_checkpointing": "selective", "selective_every": 0},
                                    {"fused_ops": "compile"}, {"lean_step": True},
                                    {"lean_step": True, "fused_ops": "compile"}])
def test_fused_and_checkpointed_paths_equal_reference(switch):
    spec = LoraSpec(r=4, alpha=8, dropout=0.0, targets=TARGETS)
    ref_loss, ref = grads(lora_model(spec), batch())
    loss, got = grads(lora_model(spec, **switch), batch())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert set(got) == set(ref)
    for name in ref:  # relative to the tensor's scale: the compiled glue reorders float32 sums
        assert (got[name] - ref[name]).abs().max() <= 1e-5 * ref[name].abs().max(), name


@pytest.mark.parametrize("lean_step", [False, True])
@pytest.mark.parametrize("chunk", [3, 4096])  # several chunks; one chunk (where lean_step defers the head's grad)
def test_chunked_loss_with_lm_head_adapter_equals_plain_autograd(lean_step, chunk):
    spec = LoraSpec(r=4, alpha=8, dropout=0.0, targets=("dense", "lm_head", "vision_embed_tokens"))
    model = lora_model(spec, lean_step=lean_step)
    model.loss_chunk_size = chunk
    b = batch()
    loss, got = grads(model, b)
    model.zero_grad(set_to_none=True)
    hidden = model(b.input_ids, b.patches, b.position_ids, b.cu_seqlens, b.max_seqlen)
    ref = torch.nn.functional.cross_entropy(model.logits(hidden).float(), b.target_ids, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_dropout_only_in_training():
    model = lora_model(LoraSpec(r=4, alpha=8, dropout=0.5, targets=TARGETS))
    b = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.loss(b)[0], model.loss(b)[0])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model.loss(b)[0], model.loss(b)[0])


def test_merge_unmerge():
    model = lora_model(LoraSpec(r=4, alpha=8, dropout=0.0, targets=TARGETS)).eval()
    b = batch()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        adapted = model.loss(b)[0]
        merge(model)
        torch.testing.assert_close(model.loss(b)[0], adapted, rtol=1e-5, atol=1e-5)
        unmerge(model)
        torch.testing.assert_close(model.loss(b)[0], adapted, rtol=1e-6, atol=1e-6)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, base[k], rtol=0, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------- errors
@pytest.fixture
def saved(tmp_path):
    model = lora_model(LoraSpec(r=4, alpha=8, dropout=0.0))
    save_peft_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def fresh(**changes):
    torch.manual_seed(0)
    return new_model(CFG.replace(**changes) if changes else CFG, attention="eager")


def test_mismatch_errors_name_the_key(saved):
    with pytest.raises(ValueError, match=r"r 4 != lora.r 8"):
        load_peft_adapter(fresh(), saved, expect=LoraSpec(r=8))
    with pytest.raises(ValueError, match=r"targets .* != lora.targets"):
        load_peft_adapter(fresh(), saved, expect=LoraSpec(r=4, targets=("dense",)))
    with pytest.raises(ValueError, match=r"layers\.0\.\S+\.lora_A\.weight has shape mismatch"):
        load_peft_adapter(fresh(hidden_size=128, intermediate_size=512), saved)  # another base
    deeper = add_lora(fresh(num_layers=3), LoraSpec(r=4, alpha=8))
    save_peft_adapter(deeper, saved.parent / "deep")
    with pytest.raises(ValueError, match=r"unexpected key .*layers\.2\."):
        load_peft_adapter(fresh(), saved.parent / "deep")  # an adapter of a deeper base
    with pytest.raises(ValueError, match=r"missing key .*layers.2"):
        load_peft_adapter(fresh(num_layers=3), saved)  # a deeper base than the adapter's


def test_rank_mismatch_in_the_file_is_named(saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "adapter_model.safetensors")
    key = "base_model.model.model.language_model.layers.1.mlp.dense_4h_to_h.lora_A.weight"
    tensors[key] = torch.zeros(2, CFG.intermediate_size)
    save_file(tensors, str(saved / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"{key} has rank mismatch"):
        load_peft_adapter(fresh(), saved)


@pytest.mark.parametrize("field,value,match", [("use_dora", True, "use_dora"), ("peft_type", "IA3", "peft_type"),
                                               ("target_modules", ".*dense", "regex"),
                                               ("target_modules", ["fc1"], "fc1"), ("bias", "all", "bias")])
def test_unsupported_adapter_configs_are_refused(saved, field, value, match):
    path = saved / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw[field] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(fresh(), saved)


def test_save_hf_refuses_unmerged_adapters(tmp_path):
    with pytest.raises(ValueError, match="LoRA adapters"):
        save_hf(lora_model(LoraSpec(r=2)), tmp_path)
    save_hf(lora_model(LoraSpec(r=2)), tmp_path, base_only=True)
    assert (tmp_path / "model.safetensors").is_file()


def test_lora_config_section(tmp_path):
    cfg = load_finetune_config(None, ["lora.enabled=true", "lora.targets=[dense, lm_head]", "lora.r=8"])
    assert cfg.lora.r == 8 and cfg.lora.targets == ["dense", "lm_head"]
    with pytest.raises(ConfigError, match="lora.targets"):
        load_finetune_config(None, ["lora.targets=[fc1]"])
    with pytest.raises(ConfigError, match="lora.r"):
        load_finetune_config(None, ["lora.r=0"])
    with pytest.raises(ConfigError, match="init_from"):
        load_finetune_config(None, ["lora.init_from=/x"])
    model = apply_lora_config(fresh(), FinetuneConfig().lora)
    assert model.lora_spec == LoraSpec()  # defaults: Otter's recipe r=64, alpha 32, dropout 0.05, four targets


def test_mfu_flops_count_frozen_base_without_weight_gradients():
    from otterhd_ray.train.metrics import flops_per_token

    model = fresh()
    full = flops_per_token(model, 10.0)
    add_lora(model, LoraSpec(r=2))
    base = sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and ".lora." not in n
               and n != "embed_tokens.weight")
    adapters_n = sum(p.numel() for p in adapter_state_dict(model).values())
    assert flops_per_token(model, 10.0) == full - 2.0 * base + 6.0 * adapters_n


def test_adapters_incl_lm_head_and_vision_train_under_bf16_autocast():
    # The torch engine's bf16 is float32 weights under autocast: the adapters' low-rank terms, the lm_head adapter's
    # extra loss columns and the vision adapter must all run there and give finite gradients to every adapter.
    from otterhd_ray.config import LoraConfig
    from tests.helpers import pack, sample

    torch.manual_seed(0)
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head", "vision_embed_tokens"]
    model = apply_lora_config(new_model(CFG, attention="sdpa", lean_step=True),
                              LoraConfig(enabled=True, r=4, dropout=0.0, targets=targets))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 at init would leave A's gradient 0: make both live
    batch = pack([sample(CFG, 2, 3, 6, 0, 3), sample(CFG, 3, 2, 5, 2, 5)])
    ref, _ = model.loss(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, _ = model.loss(batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_sum, trainable)
    assert abs(loss_sum.item() - ref.item()) < 0.02 * ref.item()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
