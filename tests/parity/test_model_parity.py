"""Our Fuyu vs transformers 5.17 `FuyuForCausalLM` on CPU in float32 at debug size (no hub, no download)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from otterhd_ray.models.fuyu import flavour_config, load_hf, new_model, normalize_patches, save_hf  # noqa: E402
from otterhd_ray.ops.attention import available_backends  # noqa: E402
from tests.helpers import sample  # noqa: E402

CFG = flavour_config("debug")
IMG, NL = CFG.image_token_id, CFG.image_token_id + 1
REL_TOL = 1e-5


def make_sample(rows: int, cols: int, num_text: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, uint8 patches) in Fuyu's layout (tests/helpers.py)."""
    return sample(CFG, rows, cols, num_text, seed)[:2]


SAMPLES = [make_sample(2, 3, 5, 0), make_sample(0, 0, 9, 1), make_sample(3, 4, 4, 2), make_sample(1, 2, 17, 3)]


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = REL_TOL) -> bool:
    return bool((ours - ref).abs().max() <= rel * ref.abs().max())


def hf_logits(hf_model, ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    kwargs = {"image_patches": normalize_patches(patches)[None]} if patches.shape[0] else {}
    with torch.no_grad():
        return hf_model(input_ids=ids[None], **kwargs).logits[0]


def our_logits(model, ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    cu = torch.tensor([0, ids.shape[0]], dtype=torch.int32)
    with torch.no_grad():
        return model.logits(model(ids, patches, torch.arange(ids.shape[0]), cu, ids.shape[0]))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    ours = new_model(CFG, attention="eager").eval()
    out = tmp_path_factory.mktemp("ours_hf")
    save_hf(ours, out)
    hf = transformers.FuyuForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    return ours, hf, out


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_logits_equal_transformers(pair, backend):
    ours, hf, _ = pair
    ours.set_switches(attention=backend)
    try:
        for ids, patches in SAMPLES:
            assert close(our_logits(ours, ids, patches), hf_logits(hf, ids, patches)), backend
    finally:
        ours.set_switches(attention="eager")


def test_transformers_sdpa_agrees_too(pair):
    ours, _, out = pair
    hf = transformers.FuyuForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    ids, patches = SAMPLES[2]
    assert close(our_logits(ours, ids, patches), hf_logits(hf, ids, patches))


def _random_hf_model() -> transformers.FuyuForCausalLM:
    torch.manual_seed(1)
    hf_cfg = transformers.FuyuConfig(**CFG.to_hf_dict())
    model = transformers.FuyuForCausalLM(hf_cfg).eval()
    # HF initialises LayerNorms to (1, 0) and biases to 0; randomise them so the key map is really exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_load_transformers_checkpoint(tmp_path, shard):
    hf = _random_hf_model()
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kwargs)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path, attention="eager").eval()
    for ids, patches in SAMPLES:
        assert close(our_logits(ours, ids, patches), hf_logits(hf, ids, patches))


def test_load_legacy_hub_layout(tmp_path):
    """adept/fuyu-8b on the hub uses the 4.x names (language_model.model.*, language_model.lm_head.*)."""
    from safetensors.torch import save_file

    hf = _random_hf_model()
    renamed = {}
    for key, t in hf.state_dict().items():
        if key.startswith("model.language_model."):
            key = "language_model.model." + key[len("model.language_model.") :]
        elif key.startswith("model.vision_embed_tokens."):
            key = key[len("model.") :]
        elif key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        renamed[key] = t.contiguous()
    save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    ours = load_hf(tmp_path).eval()
    ids, patches = SAMPLES[0]
    assert close(our_logits(ours, ids, patches), hf_logits(hf, ids, patches))


def test_round_trip_is_exact(pair, tmp_path):
    ours, _, _ = pair
    save_hf(ours, tmp_path, max_shard_bytes=50_000)  # forces several shards
    assert (tmp_path / "model.safetensors.index.json").is_file()
    back = load_hf(tmp_path)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    hf = transformers.FuyuForCausalLM.from_pretrained(tmp_path).eval()
    ids, patches = SAMPLES[3]
    assert close(our_logits(back, ids, patches), hf_logits(hf, ids, patches))


def test_pickle_refused_unless_allowed(pair, tmp_path):
    ours, hf, _ = pair
    # transformers 5 only writes safetensors: write the legacy pickle checkpoint by hand.
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    with pytest.raises(ValueError, match="pickle"):
        load_hf(tmp_path)
    loaded = load_hf(tmp_path, allow_pickle=True)
    ids, patches = SAMPLES[0]
    assert close(our_logits(loaded, ids, patches), our_logits(ours, ids, patches))


def test_missing_keys_are_an_error(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    ours, _, src = pair
    state = load_file(str(src / "model.safetensors"))
    state.pop("model.language_model.layers.1.mlp.dense_4h_to_h.bias")
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ValueError, match="dense_4h_to_h.bias"):
        load_hf(tmp_path)


def test_generate_equals_transformers(pair):
    """Batched prefill + KV-cache greedy decoding, token for token equal to HF generate (each prompt alone)."""
    ours, hf, _ = pair
    prompts = SAMPLES[:3]
    expected = []
    for ids, patches in prompts:
        kwargs = {"image_patches": normalize_patches(patches)[None]} if patches.shape[0] else {}
        with torch.no_grad():
            out = hf.generate(input_ids=ids[None], max_new_tokens=10, do_sample=False, pad_token_id=0, **kwargs)
        expected.append(out[0, ids.shape[0] :].tolist())
    assert ours.generate(prompts, max_new_tokens=10, stop_ids=[]) == expected
    # A stop id that HF emits mid-way: both stop there (HF with it as eos), the stop token included.
    stop = expected[0][4]
    ids, patches = prompts[0]
    with torch.no_grad():
        hf_out = hf.generate(
            input_ids=ids[None], image_patches=normalize_patches(patches)[None], max_new_tokens=10,
            do_sample=False, eos_token_id=stop, pad_token_id=0,
        )[0, ids.shape[0] :].tolist()
    got = ours.generate(prompts, max_new_tokens=10, stop_ids=[stop])
    assert got[0] == hf_out and got[0][-1] == stop and len(got[0]) <= 5


@pytest.mark.parametrize("share_prefix", [True, False])
def test_shared_prefix_generate_equals_transformers(pair, share_prefix):
    """Questions about one image (a group of 3 and one of 2, then a lone prompt): the shared-prefix path and the
    reference path both equal HF generate run on each prompt alone, token for token."""
    ours, hf, _ = pair
    prompts = []
    for rows, cols, num, seed in ((3, 4, 3, 20), (2, 2, 2, 21), (0, 0, 1, 22)):
        ids, patches = make_sample(rows, cols, 4, seed)
        for q in range(num):
            own = make_sample(0, 0, 2 + 2 * q, seed * 10 + q)[0][1:]  # text only, no <s>
            prompts.append((torch.cat([ids, own]), patches))
    expected = []
    for ids, patches in prompts:
        kwargs = {"image_patches": normalize_patches(patches)[None]} if patches.shape[0] else {}
        with torch.no_grad():
            out = hf.generate(input_ids=ids[None], max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)
        expected.append(out[0, ids.shape[0] :].tolist())
    got = ours.generate(prompts, max_new_tokens=8, stop_ids=[], share_prefix=share_prefix, min_shared_tokens=4)
    assert got == expected
