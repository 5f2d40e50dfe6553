"""Our LoRA vs peft 0.21 on transformers' `FuyuForCausalLM` (the oracle), CPU float32, debug size, offline.

Both directions of the PEFT file format: an adapter we write loads into peft with equal logits, an adapter peft
creates (Otter's recipe: alpha 32, dropout 0.05, + lm_head; small r for speed) loads into ours with equal logits,
and merging equals peft's `merge_and_unload`.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from otterhd_ray.models.fuyu import flavour_config, load_hf, new_model, save_hf  # noqa: E402
from otterhd_ray.models.fuyu.hf import key_map  # noqa: E402
from otterhd_ray.models.fuyu.inputs import normalize_patches  # noqa: E402
from otterhd_ray.models.fuyu.lora import TARGETS, LoraSpec, adapters, add_lora, remove_lora  # noqa: E402
from otterhd_ray.models.fuyu.peft import load_peft_adapter, save_peft_adapter  # noqa: E402

CFG = flavour_config("debug")
IMG, NL = CFG.image_token_id, CFG.image_token_id + 1
REL_TOL = 1e-5


def sample(rows: int, cols: int, num_text: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = ([IMG] * cols + [NL]) * rows
    text = torch.randint(3, IMG, (num_text,), generator=g).tolist()
    ids = torch.tensor(image + [CFG.bos_token_id] + text, dtype=torch.long)
    return ids, torch.randint(0, 256, (rows * cols, CFG.patch_dim), dtype=torch.uint8, generator=g)


SAMPLES = [sample(2, 3, 5, 0), sample(0, 0, 9, 1), sample(3, 4, 4, 2)]


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = REL_TOL) -> bool:
    return bool((ours - ref).abs().max() <= rel * ref.abs().max())


def hf_logits(model, ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    kwargs = {"image_patches": normalize_patches(patches)[None]} if patches.shape[0] else {}
    with torch.no_grad():
        return model(input_ids=ids[None], **kwargs).logits[0]


def our_logits(model, ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    cu = torch.tensor([0, ids.shape[0]], dtype=torch.int32)
    with torch.no_grad():
        return model.logits(model(ids, patches, torch.arange(ids.shape[0]), cu, ids.shape[0]))


def randomise_adapters(model, seed: int = 0) -> None:
    """B starts at zero (a no-op adapter); random factors make the parity checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in adapters(model):
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base")
    save_hf(new_model(CFG, attention="eager"), out)
    return out


def ours_with_adapter(base_dir, spec: LoraSpec):
    model = load_hf(base_dir, attention="eager").eval()
    add_lora(model, spec)
    randomise_adapters(model)
    return model


@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_into_peft_with_equal_logits(base_dir, tmp_path, rslora):
    spec = LoraSpec(r=4, alpha=32, dropout=0.05, targets=TARGETS, rslora=rslora)
    ours = ours_with_adapter(base_dir, spec)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    hf = transformers.FuyuForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    plain = transformers.FuyuForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
    for ids, patches in SAMPLES:
        ref = hf_logits(theirs, ids, patches)
        assert close(our_logits(ours, ids, patches), ref)
        assert not close(hf_logits(plain, ids, patches), ref, 1e-3)  # the adapter really changes the output


def peft_otter_adapter(base_dir, out_dir, r: int = 4, seed: int = 3):
    """An adapter made by peft itself with Otter's recipe (alpha 32, dropout 0.05, + lm_head), B randomised."""
    hf = transformers.FuyuForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    config = peft.LoraConfig(r=r, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                             target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"])
    model = peft.get_peft_model(hf, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(out_dir)
    return model.eval()


def test_peft_adapter_loads_into_ours(base_dir, tmp_path):
    theirs = peft_otter_adapter(base_dir, tmp_path / "adapter")
    ours = load_hf(base_dir, attention="eager").eval()
    spec = load_peft_adapter(ours, tmp_path / "adapter")
    assert spec.targets == ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head")
    assert (spec.r, spec.alpha, spec.dropout) == (4, 32.0, 0.05)
    for ids, patches in SAMPLES:
        assert close(our_logits(ours, ids, patches), hf_logits(theirs, ids, patches))
    # Generation goes through the same layer forward and the lm_head hook.
    ids, patches = SAMPLES[0]
    ours_tokens = ours.generate([(ids, patches)], max_new_tokens=4, share_prefix=False)[0]
    greedy = hf_logits(theirs, ids, patches)[-1].argmax().item()
    assert ours_tokens[0] == greedy


def test_merge_equals_peft_merge_and_unload(base_dir, tmp_path):
    theirs = peft_otter_adapter(base_dir, tmp_path / "adapter")
    ours = load_hf(base_dir, attention="eager").eval()
    load_peft_adapter(ours, tmp_path / "adapter")
    merged_ref = theirs.merge_and_unload().state_dict()
    remove_lora(ours, merge_first=True)
    hf_keys = key_map(CFG)
    for name, t in ours.state_dict().items():
        assert torch.allclose(t, merged_ref[hf_keys[name]], rtol=0, atol=1e-6), name
    # And the merged model, saved as an HF dir, is what transformers loads.
    save_hf(ours, tmp_path / "merged")
    back = transformers.FuyuForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    ids, patches = SAMPLES[2]
    assert close(hf_logits(back, ids, patches), hf_logits(theirs, ids, patches))


def test_round_trip_ours_peft_ours_is_exact(base_dir, tmp_path):
    spec = LoraSpec(r=3, alpha=6, dropout=0.0, targets=("query_key_value", "dense_4h_to_h", "vision_embed_tokens"))
    ours = ours_with_adapter(base_dir, spec)
    save_peft_adapter(ours, tmp_path / "a")
    back = load_hf(base_dir, attention="eager").eval()
    assert load_peft_adapter(back, tmp_path / "a") == spec
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
