"""The packed model: packing invariance, loss, activation checkpointing, decoding, config and build."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from otterhd_ray.config import ModelConfig
from otterhd_ray.models.fuyu import FuyuForCausalLM, build_model, flavour_config, new_model
from otterhd_ray.models.fuyu.config import FuyuModelConfig
from otterhd_ray.ops.attention import available_backends
from tests import helpers
from tests.helpers import pack

CFG = flavour_config("debug")
IMG = CFG.image_token_id


def sample(rows, cols, num_text, seed, num_targets=3):
    return helpers.sample(CFG, rows, cols, num_text, seed, num_targets)


SAMPLES = [sample(2, 3, 6, 0), sample(0, 0, 8, 1), sample(3, 2, 5, 2, num_targets=5), sample(1, 1, 1, 3, 1)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return new_model(CFG, attention="eager")


def forward(m, batch):
    return m(batch.input_ids, batch.patches, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_packed_forward_equals_each_sample_alone(model, backend):
    model.set_switches(attention=backend)
    with torch.no_grad():
        packed = forward(model, pack(SAMPLES))
        alone = torch.cat([forward(model, pack([s])) for s in SAMPLES])
    model.set_switches(attention="eager")
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_patch_count_mismatch_is_an_error(model):
    batch = pack(SAMPLES[:1])
    batch = dataclasses.replace(batch, patches=batch.patches[:-1])
    with pytest.raises(RuntimeError, match="image patches"):
        forward(model, batch)


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, name: str, rel: float = 1e-5) -> None:
    """Max abs error within `rel` of the tensor's scale (float32 summation order differs between paths)."""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rel * scale + 1e-8, f"{name}: max error {err:.3g} vs scale {scale:.3g}"


def full_logits_loss(m, batch):
    logits = m.logits(forward(m, batch)).float()
    return F.cross_entropy(logits, batch.target_ids, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [2, 2048])
def test_loss_equals_reference_and_gradients(chunk):
    torch.manual_seed(1)
    m = new_model(CFG, attention="eager", loss_chunk_size=chunk)
    batch = pack(SAMPLES)
    ref = full_logits_loss(m, batch)
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    loss_sum, num = m.loss(batch)
    grads = torch.autograd.grad(loss_sum, list(m.parameters()))
    assert num == batch.num_target_tokens == 3 + 3 + 5 + 1
    torch.testing.assert_close(loss_sum, ref)
    for (name, _), a, b in zip(m.named_parameters(), grads, ref_grads, strict=True):
        assert_rel_close(a, b, name)


@pytest.mark.parametrize("lean", [False, True])
def test_loss_under_autocast_close_to_float32(lean):
    # fp32 weights under bf16 autocast: the patch projection comes out in bf16 and must be scattered into the
    # float32 embeddings (it raised a dtype error in masked_scatter / index_copy before).
    torch.manual_seed(1)
    m = new_model(CFG, attention="sdpa", lean_step=lean)
    batch = pack(SAMPLES)
    ref, _ = m.loss(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, num = m.loss(batch)
    grads = torch.autograd.grad(loss_sum, list(m.parameters()))
    assert num == batch.num_target_tokens and loss_sum.dtype == torch.float32
    assert abs(loss_sum.item() - ref.item()) < 0.02 * ref.item()
    assert all(torch.isfinite(g).all() for g in grads)


def test_loss_without_count_and_without_targets(model):
    batch = pack(SAMPLES)
    n = batch.num_target_tokens
    loss_sum, num = model.loss(dataclasses.replace(batch, num_target_tokens=None))
    assert num == n and loss_sum.item() > 0
    empty = pack([sample(1, 2, 4, 5, num_targets=0)])
    loss_sum, num = model.loss(empty)
    assert num == 0 and loss_sum.item() == 0.0


@pytest.mark.parametrize("mode,every", [("selective", 2), ("selective", 0), ("full", 2)])
def test_activation_checkpointing_gradient_parity(mode, every):
    torch.manual_seed(2)
    m = new_model(CFG, attention="sdpa").train()
    batch = pack(SAMPLES)
    ref_loss, _ = m.loss(batch)
    ref_grads = torch.autograd.grad(ref_loss, list(m.parameters()))
    m.set_switches(activation_checkpointing=mode, selective_every=every)
    loss_sum, _ = m.loss(batch)
    grads = torch.autograd.grad(loss_sum, list(m.parameters()))
    torch.testing.assert_close(loss_sum, ref_loss)
    for (name, _), a, b in zip(m.named_parameters(), grads, ref_grads, strict=True):
        assert_rel_close(a, b, name)


def test_selective_checkpointing_recomputes_what_it_says():
    """Op-level: matmuls kept, norms recomputed; layer-level: every N-th layer recomputed; full: every layer."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    m = new_model(CFG.replace(num_layers=4), attention="sdpa").train()
    batch = pack(SAMPLES)

    def counts(mode, every=2):
        m.set_switches(activation_checkpointing=mode, selective_every=every)
        with CountOps() as c:
            m.loss(batch)[0].backward()
        return c.counts

    def matmuls(c):
        return c["mm"] + c["addmm"]

    none, op_level, layers, full = counts("none"), counts("selective", 0), counts("selective", 2), counts("full")
    assert matmuls(op_level) == matmuls(none)  # op-level: no matmul recomputed...
    assert op_level["native_layer_norm"] > none["native_layer_norm"]  # ...but the norms are
    per_layer = (matmuls(full) - matmuls(none)) / 4  # full recomputes every layer's forward matmuls
    assert per_layer > 0
    assert matmuls(layers) - matmuls(none) == 2 * per_layer  # every 2nd layer of 4: two layers recomputed


def test_generate_batched_equals_one_by_one(model):
    prompts = [(s[0], s[1]) for s in SAMPLES]
    batched = model.generate(prompts, max_new_tokens=6, stop_ids=[])
    singles = [model.generate([p], max_new_tokens=6, stop_ids=[])[0] for p in prompts]
    assert batched == singles and all(len(r) == 6 for r in batched)
    stop = batched[0][2]
    stopped = model.generate(prompts, max_new_tokens=6, stop_ids=[stop])
    first = batched[0].index(stop)
    assert stopped[0] == batched[0][: first + 1]
    for full, cut in zip(batched, stopped, strict=True):
        assert full[: len(cut)] == cut
    assert model.generate(prompts, max_new_tokens=0) == [[], [], [], []]


def test_flavours_and_config_round_trip():
    big = flavour_config("fuyu-8b")
    assert (big.num_layers, big.hidden_size, big.num_heads, big.head_dim, big.rotary_dim) == (36, 4096, 64, 64, 32)
    assert 9.3e9 < big.num_params() < 9.5e9
    m = new_model(CFG)
    assert sum(p.numel() for p in m.parameters()) == CFG.num_params()
    assert FuyuModelConfig.from_hf_dict(CFG.to_hf_dict()) == CFG
    legacy = {"model_type": "fuyu", "rope_theta": 25000.0, "partial_rotary_factor": 0.5, "text_config": {"num_hidden_layers": 3}}
    assert FuyuModelConfig.from_hf_dict(legacy).num_layers == 3
    with pytest.raises(ValueError, match="flavour"):
        flavour_config("fuyu-70b")
    with pytest.raises(ValueError):
        CFG.replace(num_heads=5)
    with pytest.raises(ValueError, match="image_token_id"):
        CFG.replace(image_token_id=CFG.vocab_size)


def test_build_model_from_config(tiny_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    m = build_model(ModelConfig(flavour="debug", num_layers=1, attention="eager"), tokenizer=tok)
    assert isinstance(m, FuyuForCausalLM) and len(m.layers) == 1
    assert m.config.image_token_id == tok.convert_tokens_to_ids("|SPEAKER|") and m.config.vocab_size >= len(tok)
    with pytest.raises(ValueError, match="not available on cpu"):
        build_model(ModelConfig(attention="varlen"), dtype=torch.bfloat16)
    bf16 = build_model(ModelConfig(), dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_build_model_loads_path(tmp_path):
    from otterhd_ray.models.fuyu import save_hf

    torch.manual_seed(3)
    src = new_model(CFG)
    save_hf(src, tmp_path)
    m = build_model(ModelConfig(path=str(tmp_path), num_layers=1))
    assert len(m.layers) == 1
    torch.testing.assert_close(m.layers[0].mlp.dense_h_to_4h.weight, src.layers[0].mlp.dense_h_to_4h.weight)


def test_importing_the_model_package_loads_torch_only():
    """`import otterhd_ray.models.fuyu` (what a GPU worker or the data layer pulls in) loads torch and none of
    the data / config stack: transformers, PIL, pydantic, yaml (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, otterhd_ray.models.fuyu\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'PIL', 'pydantic', 'yaml'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "['torch']", out.stdout + out.stderr


def test_packed_batch_checks_shapes_moves_and_pickles(model):
    import pickle

    batch = pack(SAMPLES)
    assert batch.num_tokens == int(batch.cu_seqlens[-1]) and batch.num_samples == len(SAMPLES)
    with pytest.raises(ValueError, match="target_ids"):
        dataclasses.replace(batch, target_ids=batch.target_ids[:-1])
    with pytest.raises(ValueError, match="input_ids"):
        dataclasses.replace(batch, input_ids=batch.input_ids[None], target_ids=batch.target_ids[None])
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.max_seqlen = 1
    moved = batch.to("meta")
    assert moved.input_ids.device.type == "meta" and moved.num_target_tokens == batch.num_target_tokens
    again = pickle.loads(pickle.dumps(batch))
    assert all(torch.equal(getattr(again, f.name), getattr(batch, f.name))
               for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor))
    with pytest.raises(TypeError, match="PackedBatch"):
        model.loss(dataclasses.asdict(batch))
