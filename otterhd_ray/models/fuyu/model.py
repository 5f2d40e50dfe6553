"""Fuyu (Persimmon decoder + linear patch embedding) as a single-device PyTorch module.

Training runs on *packed* rows: many samples concatenated without padding, `cu_seqlens` marking their bounds and
`position_ids` restarting at 0 per sample, so rotary positions and the (document-causal) attention see each
sample exactly as if it ran alone. One layer forward (`decoder`, the only loop over the layers) serves training,
prefill and decoding: it takes an attention strategy (`models/fuyu/attention.py`) that is packed attention for
training, packed attention that also fills a KV cache for prefill, and cached attention for decode steps.
Decoding itself lives in `models/fuyu/generate.py` (`generate` here is a thin wrapper over it).

Every projection's tensors are read through `projection()` and computed by `ops.fused.project`: the one place a
low-rank adapter hooks in (see docs/internals.md "Model API").

No Ray, DeepSpeed or data code here (`inputs.PackedBatch` is the batch contract; docs/internals.md).

Legend: T packed tokens, D hidden, H heads, K head dim, R rotary dims, P patches, C patch values (2700),
B prompts, V vocabulary, N supervised rows.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

from otterhd_ray.models.fuyu.attention import LayerAttention, PackedAttention
from otterhd_ray.models.fuyu.config import FuyuModelConfig
from otterhd_ray.models.fuyu.generate import Prompts, generate
from otterhd_ray.models.fuyu.inputs import IGNORE_INDEX, PackedBatch, normalize_patches
from otterhd_ray.models.fuyu.lora import head_operands
from otterhd_ray.ops.attention import resolve_attention
from otterhd_ray.ops.fused import (
    FusedOps,
    LayerWeights,
    Projection,
    project,
    resolve_fused_ops,
    rotary_cos_sin,
)
from otterhd_ray.ops.loss import linear_cross_entropy, softmax_grad_reference

CHECKPOINTING = ("none", "selective", "full")
__all__ = ["CHECKPOINTING", "FuyuForCausalLM", "new_model", "projection"]


def projection(linear: nn.Linear) -> Projection:
    """The tensors of one projection (query_key_value, dense, dense_h_to_4h, dense_4h_to_h, vision_embed_tokens,
    lm_head), read at every forward and computed by `ops.fused.project`. This pair is where an adapter attaches:
    a LoRA layer hands its low-rank factors over here and `project` adds the update inside the (compiled) glue,
    without merging them into the weight."""
    adapter = getattr(linear, "lora", None)
    if adapter is None or adapter.merged:
        return Projection(linear.weight, linear.bias)
    return Projection(linear.weight, linear.bias, adapter.A, adapter.B, adapter.scale, adapter.dropout)


# ---------------------------------------------------------------------------------------------- modules
class FuyuAttention(nn.Module):
    def __init__(self, cfg: FuyuModelConfig):
        super().__init__()
        D, K = cfg.hidden_size, cfg.head_dim
        self.query_key_value = nn.Linear(D, 3 * D, bias=True)
        self.dense = nn.Linear(D, D, bias=True)
        if cfg.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(K, eps=cfg.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(K, eps=cfg.layer_norm_eps)


class FuyuMLP(nn.Module):
    def __init__(self, cfg: FuyuModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)


class FuyuDecoderLayer(nn.Module):
    """Parameters only; the computation lives in the (fusable) glue functions of `otterhd_ray.ops.fused`."""

    def __init__(self, cfg: FuyuModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = FuyuAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = FuyuMLP(cfg)

    def weights(self) -> LayerWeights:
        a, m = self.self_attn, self.mlp
        qk = hasattr(a, "q_layernorm")
        return LayerWeights(
            ln1_w=self.input_layernorm.weight,
            ln1_b=self.input_layernorm.bias,
            qkv=projection(a.query_key_value),
            qn_w=a.q_layernorm.weight if qk else None,
            qn_b=a.q_layernorm.bias if qk else None,
            kn_w=a.k_layernorm.weight if qk else None,
            kn_b=a.k_layernorm.bias if qk else None,
            dense=projection(a.dense),
            ln2_w=self.post_attention_layernorm.weight,
            ln2_b=self.post_attention_layernorm.bias,
            up=projection(m.dense_h_to_4h),
            down=projection(m.dense_4h_to_h),
            training=self.training,
        )


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Keep what is expensive to recompute (matmuls, attention); recompute norms, rotary, relu² and adds."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _save_ops() -> set:
    ops = {
        torch.ops.aten.mm.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.bmm.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
        torch.ops.aten._flash_attention_forward.default,
    }
    with contextlib.suppress(AttributeError, RuntimeError):
        importlib.import_module("torch.nn.attention.varlen")  # registers the torch_attn ops

        ops.add(torch.ops.torch_attn._varlen_attn.default)
    with contextlib.suppress(AttributeError, RuntimeError):
        ops.add(torch.ops.higher_order.flex_attention)
    return ops


_SAVE_OPS = _save_ops()


# ------------------------------------------------------------------------------------------------ model
class FuyuForCausalLM(nn.Module):
    """Fuyu decoder. Switches (attention backend, fused ops, checkpointing) are resolved once per device.

    `lean_step` removes per-micro-batch fixed costs that small micro-batches (the seed recipe's 8 samples, ~4.6k
    tokens) do not amortise, with the same values up to rounding: the image patches are merged by index instead
    of `masked_scatter` (whose backward runs `masked_select`, a device->host sync every micro-batch), and the
    loss defers the LM head's weight gradient and, under `fused_ops=compile`, compiles its softmax math
    (`ops/loss.py`). Off, the model runs the previous path (the reference for the tests and benchmarks)."""

    def __init__(
        self,
        config: FuyuModelConfig,
        attention: str = "auto",
        fused_ops: str = "none",
        activation_checkpointing: str = "none",
        loss_chunk_size: int = 2048,
        selective_every: int = 2,
        lean_step: bool = False,
    ):
        super().__init__()
        self.lean_step = lean_step
        if selective_every < 0:
            raise ValueError(f"selective_every must be >= 0, got {selective_every}")
        self.selective_every = selective_every
        if activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {CHECKPOINTING}, got {activation_checkpointing!r}")
        if loss_chunk_size <= 0:
            raise ValueError(f"loss_chunk_size must be positive, got {loss_chunk_size}")
        self.config = config
        self.attention = attention
        self.fused_ops = fused_ops
        self.activation_checkpointing = activation_checkpointing
        self.loss_chunk_size = loss_chunk_size
        self._resolved: dict[str, tuple[str, FusedOps]] = {}

        D = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, D)
        self.vision_embed_tokens = nn.Linear(config.patch_dim, D)
        self.layers = nn.ModuleList(FuyuDecoderLayer(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(D, config.vocab_size, bias=False)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """transformers' Fuyu initialisation: N(0, 0.02) matrices and embeddings, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def set_switches(
        self,
        attention: str | None = None,
        fused_ops: str | None = None,
        activation_checkpointing: str | None = None,
        selective_every: int | None = None,
        lean_step: bool | None = None,
    ) -> None:
        """Change a switch (tests, benchmarks); takes effect at the next forward."""
        if lean_step is not None:
            self.lean_step = lean_step
        if selective_every is not None:
            self.selective_every = selective_every
        if activation_checkpointing is not None:
            if activation_checkpointing not in CHECKPOINTING:
                raise ValueError(f"activation_checkpointing must be one of {CHECKPOINTING}")
            self.activation_checkpointing = activation_checkpointing
        if attention is not None:
            self.attention = attention
        if fused_ops is not None:
            self.fused_ops = fused_ops
        self._resolved.clear()

    def resolve(self, device: torch.device | str, dtype: torch.dtype | None = None) -> tuple[str, FusedOps]:
        """The attention backend and fused ops for `device` and the weights' dtype (checked once)."""
        device = torch.device(device)
        dtype = dtype or self.embed_tokens.weight.dtype
        key = f"{device.type}:{dtype}"
        if key not in self._resolved:
            self._resolved[key] = (
                resolve_attention(self.attention, device, dtype),
                resolve_fused_ops(self.fused_ops, device),
            )
        return self._resolved[key]

    # ------------------------------------------------------------------------------------------ forward
    def embed(self, input_ids_T: torch.Tensor, patches_PC: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image placeholder replaced by its patch's projection (in order)."""
        x_TD = self.embed_tokens(input_ids_T)
        is_image = input_ids_T == self.config.image_token_id
        num_patches = 0 if patches_PC is None else patches_PC.shape[0]
        # Device-side check (no host sync on GPU): every placeholder needs exactly one patch.
        torch._assert_async(is_image.sum() == num_patches, "number of image patches != number of |SPEAKER| tokens")
        if num_patches:
            if patches_PC.shape[-1] != self.config.patch_dim:
                raise ValueError(f"patches must be [P, {self.config.patch_dim}], got {tuple(patches_PC.shape)}")
            # uint8 patches are raw pixels (the batch contract); float patches are taken as already normalised.
            pixels = normalize_patches(patches_PC) if patches_PC.dtype == torch.uint8 else patches_PC
            patch_PD = project(pixels.to(x_TD.dtype), projection(self.vision_embed_tokens), self.training)
            # Under autocast the projection comes out in bf16 while the embeddings stay float32 (as in
            # transformers, which casts the patch features to the embeddings' dtype before the scatter).
            patch_PD = patch_PD.to(x_TD.dtype)
            if self.lean_step:
                # The placeholders' rows, found without a host sync (the count is the patch count); index_copy's
                # backward is an index_select, where masked_scatter's is a masked_select (a sync).
                rows_P = torch.nonzero_static(is_image, size=num_patches, fill_value=0)[:, 0]
                x_TD = x_TD.index_copy(0, rows_P, patch_PD)
            else:
                x_TD = x_TD.masked_scatter(is_image[:, None], patch_PD)
        elif torch.is_grad_enabled():
            # A micro-batch of text-only samples: run the patch projection on zero rows (adds exactly 0) so its
            # parameters still get a (zero) gradient and every rank's DDP/ZeRO reductions match.
            x_TD = x_TD + self.vision_embed_tokens(x_TD.new_zeros(0, self.config.patch_dim)).sum()
        return x_TD

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [.., R] of the rotary embedding at `position_ids`."""
        return rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta, dtype)

    def decoder(
        self, x_TD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor, attention: LayerAttention
    ) -> torch.Tensor:
        """Every decoder layer in order — the one layer loop of training, prefill and decode steps.

        `attention` says how each layer attends (packed, packed + filling a KV cache, or over a cache; see
        `models/fuyu/attention.py`). Activation checkpointing applies when training with gradients enabled."""
        _, ops = self.resolve(x_TD.device)
        ckpt = self.activation_checkpointing if torch.is_grad_enabled() and self.training else "none"
        op_level = ckpt == "selective" and self.selective_every == 0
        if op_level and ops.mode == "compile":
            # The op-level policy must see the aten ops (matmuls to keep, norms to recompute); a compiled region
            # is opaque to it (and torch.compile does not run under its dispatch mode), so these layers use the
            # plain glue.
            ops = resolve_fused_ops("none", x_TD.device)
        for i, layer in enumerate(self.layers):
            fn = functools.partial(self._layer, i, layer, attention=attention, ops=ops)
            if ckpt == "selective" and not op_level:
                # Layer-level selection: every N-th layer is recomputed whole, the others keep their activations
                # (compiled glue allowed; measured faster than the op-level policy at 36 layers on an H100).
                mode = "full" if i % self.selective_every == 0 else "none"
            else:
                mode = ckpt
            x_TD = _checkpointed(fn, mode, x_TD, cos_TR, sin_TR)
        return x_TD

    def _layer(
        self,
        index: int,
        layer: FuyuDecoderLayer,
        x_TD: torch.Tensor,
        cos_TR: torch.Tensor,
        sin_TR: torch.Tensor,
        attention: LayerAttention,
        ops: FusedOps,
    ) -> torch.Tensor:
        w = layer.weights()
        q, k, v = ops.attn_in(x_TD, w, cos_TR, sin_TR, self.config.num_heads, self.config.layer_norm_eps)
        o_THK = attention(index, q, k, v)
        if o_THK is None:  # the attention only filled a cache: this layer's output feeds nothing
            return x_TD
        return ops.attn_out(x_TD, o_THK, w, self.config.layer_norm_eps)

    def final_norm(self, x_TD: torch.Tensor) -> torch.Tensor:
        w, b = self.final_layernorm.weight, self.final_layernorm.bias
        return nn.functional.layer_norm(x_TD, (x_TD.shape[-1],), w, b, self.config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        patches: torch.Tensor | None,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        """Packed forward -> final hidden states [T, D] (apply `logits` or use `loss` for logits)."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be a packed 1-D row [T], got shape {tuple(input_ids.shape)}")
        backend, _ = self.resolve(input_ids.device)
        x_TD = self.embed(input_ids, patches)
        cos_TR, sin_TR = self.rotary(position_ids, x_TD.dtype)
        attention = PackedAttention(cu_seqlens.to(torch.int32), max_seqlen, backend)
        return self.final_norm(self.decoder(x_TD, cos_TR, sin_TR, attention))

    def logits(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        return project(hidden_ND, projection(self.lm_head), self.training)

    def next_token_logits(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, V] from the last layer's output (before the final norm) at B positions."""
        return self.logits(self.final_norm(x_BD)).float()

    # --------------------------------------------------------------------------------------------- loss
    def loss(self, batch: PackedBatch) -> tuple[torch.Tensor, int]:
        """(sum of token cross-entropies over supervised positions, their count) for one packed micro-batch.

        Only the supervised rows reach the LM head, in chunks of `loss_chunk_size`: the [T, V] logits never exist.
        """
        if not isinstance(batch, PackedBatch):  # a dict of the old contract, or the data layer's MicroBatch
            raise TypeError(f"loss takes a PackedBatch (models/fuyu/inputs.py), got {type(batch).__name__}; "
                            "a data-pipeline MicroBatch carries it as `.packed`")
        hidden_TD = self(batch.input_ids, batch.patches, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        targets_T = batch.target_ids
        supervised_T = targets_T != IGNORE_INDEX
        num = batch.num_target_tokens
        if num is None:
            num = int(supervised_T.sum())  # host sync; the packer provides the count to avoid it
        # nonzero_static needs the count up front, which the batch carries: no device->host sync here.
        rows_N = torch.nonzero_static(supervised_T, size=num, fill_value=0)[:, 0]
        # The chunked loss takes one weight: an adapter on lm_head joins it as extra columns (lora.head_operands).
        h_ND, head_VD = head_operands(hidden_TD.index_select(0, rows_N), projection(self.lm_head), self.training)
        _, ops = self.resolve(hidden_TD.device)
        loss_sum = linear_cross_entropy(
            h_ND, head_VD, targets_T.index_select(0, rows_N), self.loss_chunk_size, ignore_index=IGNORE_INDEX,
            softmax_grad=ops.softmax_grad if self.lean_step else softmax_grad_reference,
            defer_weight_grad=self.lean_step,
        )
        return loss_sum, num

    # ----------------------------------------------------------------------------------------- decoding
    def generate(
        self,
        prompts: Prompts,
        max_new_tokens: int,
        stop_ids: Sequence[int] | None = None,
        share_prefix: bool = True,
        min_shared_tokens: int = 32,
        prefill_chunk_tokens: int = 32_768,
    ) -> list[list[int]]:
        """Greedy decoding with a KV cache: `otterhd_ray.models.fuyu.generate.generate` (see there)."""
        return generate(
            self, prompts, max_new_tokens, stop_ids, share_prefix=share_prefix, min_shared_tokens=min_shared_tokens,
            prefill_chunk_tokens=prefill_chunk_tokens,
        )


def _checkpointed(fn: Callable[..., torch.Tensor], mode: str, *args: torch.Tensor) -> torch.Tensor:
    """`fn(*args)` under activation checkpointing `mode` (none, full, or the selective op-level policy)."""
    if mode == "none":
        return fn(*args)
    if mode == "full":
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False)
    context_fn = functools.partial(torch_checkpoint.create_selective_checkpoint_contexts, _selective_policy)
    return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)


def new_model(
    cfg: FuyuModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **switches: Any
) -> FuyuForCausalLM:
    """Randomly initialised model allocated directly in `dtype` on `device` (no float32 CPU copy of 8B)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return FuyuForCausalLM(cfg, **switches)
    finally:
        torch.set_default_dtype(previous)
