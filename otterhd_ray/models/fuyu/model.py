"""Fuyu (Persimmon decoder + linear patch embedding) as a single-device PyTorch module.

Training runs on *packed* rows: many samples concatenated without padding, `cu_seqlens` marking their bounds and
`position_ids` restarting at 0 per sample, so rotary positions and the (document-causal) attention see each
sample exactly as if it ran alone. Evaluation decodes greedily with a KV cache after a packed prefill; prompts
that start with the same image (the questions about one item) prefill and store that shared prefix once.

No Ray, DeepSpeed or data code here (see docs/internals.md for the batch contract).

Legend: T packed tokens, D hidden, H heads, K head dim, R rotary dims, P patches, C patch values (2700),
B prompts, L cache length, V vocabulary, N supervised rows, G prompt groups sharing a prefix, Q queries per group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

from otterhd_ray.data.processor import normalize_patches
from otterhd_ray.models.fuyu.config import FuyuModelConfig
from otterhd_ray.models.fuyu.lora import head_operands, params_of
from otterhd_ray.ops.attention import cached_attention, packed_attention, resolve_attention
from otterhd_ray.ops.fused import FusedOps, LayerWeights, resolve_fused_ops, rotary_cos_sin
from otterhd_ray.ops.loss import IGNORE_INDEX, linear_cross_entropy

CHECKPOINTING = ("none", "selective", "full")
# Decoding input: (input_ids int64 [T], patches [P, C] or None) per prompt.
Prompts = Sequence[tuple[torch.Tensor, torch.Tensor | None]]
# One (k, v) pair of [G, H, L, K] per layer (the grouped cache of shared-prefix decoding).
_Cache = list[tuple[torch.Tensor, torch.Tensor]]
__all__ = ["FuyuForCausalLM", "build_model", "new_model", "normalize_patches", "prefix_groups"]


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
            qkv_w=a.query_key_value.weight,
            qkv_b=a.query_key_value.bias,
            qn_w=a.q_layernorm.weight if qk else None,
            qn_b=a.q_layernorm.bias if qk else None,
            kn_w=a.k_layernorm.weight if qk else None,
            kn_b=a.k_layernorm.bias if qk else None,
            dense_w=a.dense.weight,
            dense_b=a.dense.bias,
            ln2_w=self.post_attention_layernorm.weight,
            ln2_b=self.post_attention_layernorm.bias,
            up_w=m.dense_h_to_4h.weight,
            up_b=m.dense_h_to_4h.bias,
            down_w=m.dense_4h_to_h.weight,
            down_b=m.dense_4h_to_h.bias,
            qkv_lora=params_of(a.query_key_value),
            dense_lora=params_of(a.dense),
            up_lora=params_of(m.dense_h_to_4h),
            down_lora=params_of(m.dense_4h_to_h),
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
    """Fuyu decoder. Switches (attention backend, fused ops, checkpointing) are resolved once per device."""

    def __init__(
        self,
        config: FuyuModelConfig,
        attention: str = "auto",
        fused_ops: str = "none",
        activation_checkpointing: str = "none",
        loss_chunk_size: int = 2048,
        selective_every: int = 2,
    ):
        super().__init__()
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
    ) -> None:
        """Change a switch (tests, benchmarks); takes effect at the next forward."""
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
            patch_PD = self.vision_embed_tokens(pixels.to(x_TD.dtype))
            x_TD = x_TD.masked_scatter(is_image[:, None], patch_PD)
        return x_TD

    def _layer(
        self, layer: FuyuDecoderLayer, x_TD, cos_TR, sin_TR, cu_seqlens, max_seqlen, backend: str, ops: FusedOps
    ) -> torch.Tensor:
        w = layer.weights()
        q, k, v = ops.attn_in(x_TD, w, cos_TR, sin_TR, self.config.num_heads, self.config.layer_norm_eps)
        o_THK = packed_attention(q, k, v, cu_seqlens, max_seqlen, backend)
        return ops.attn_out(x_TD, o_THK, w, self.config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        patches: torch.Tensor | None,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
    ) -> torch.Tensor:
        """Packed forward -> final hidden states [T, D] (apply `lm_head` or use `loss` for logits)."""
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be a packed 1-D row [T], got shape {tuple(input_ids.shape)}")
        backend, ops = self.resolve(input_ids.device)
        x_TD = self.embed(input_ids, patches)
        cos_TR, sin_TR = rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta, x_TD.dtype)
        cu_seqlens = cu_seqlens.to(torch.int32)
        ckpt = self.activation_checkpointing if torch.is_grad_enabled() and self.training else "none"
        op_level = ckpt == "selective" and self.selective_every == 0
        if op_level and ops.mode == "compile":
            # The op-level policy must see the aten ops (matmuls to keep, norms to recompute); a compiled region
            # is opaque to it (and torch.compile does not run under its dispatch mode), so these layers use the
            # plain glue.
            ops = resolve_fused_ops("none", input_ids.device)
        for i, layer in enumerate(self.layers):
            fn = functools.partial(self._layer, layer, backend=backend, ops=ops)
            if ckpt == "selective" and not op_level:
                # Layer-level selection: every N-th layer is recomputed whole, the others keep their activations
                # (compiled glue allowed; measured faster than the op-level policy at 36 layers on an H100).
                mode = "full" if i % self.selective_every == 0 else "none"
            else:
                mode = ckpt
            if mode == "none":
                x_TD = fn(x_TD, cos_TR, sin_TR, cu_seqlens, max_seqlen)
            elif mode == "full":
                x_TD = torch_checkpoint.checkpoint(fn, x_TD, cos_TR, sin_TR, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                context_fn = functools.partial(torch_checkpoint.create_selective_checkpoint_contexts, _selective_policy)
                x_TD = torch_checkpoint.checkpoint(
                    fn, x_TD, cos_TR, sin_TR, cu_seqlens, max_seqlen, use_reentrant=False, context_fn=context_fn
                )
        return nn.functional.layer_norm(
            x_TD, (x_TD.shape[-1],), self.final_layernorm.weight, self.final_layernorm.bias, self.config.layer_norm_eps
        )

    def logits(self, hidden_ND: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_ND)

    # --------------------------------------------------------------------------------------------- loss
    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """(sum of token cross-entropies over supervised positions, their count) for one packed micro-batch.

        Only the supervised rows reach the LM head, in chunks of `loss_chunk_size`: the [T, V] logits never exist.
        """
        hidden_TD = self(
            batch["input_ids"], batch.get("patches"), batch["position_ids"], batch["cu_seqlens"], batch["max_seqlen"]
        )
        targets_T = batch["target_ids"]
        supervised_T = targets_T != IGNORE_INDEX
        num = batch.get("num_target_tokens")
        if num is None:
            num = int(supervised_T.sum())  # host sync; the packer provides the count to avoid it
        num = int(num)
        # nonzero_static needs the count up front, which the batch carries: no device->host sync here.
        rows_N = torch.nonzero_static(supervised_T, size=num, fill_value=0)[:, 0]
        h_ND, head_VD = head_operands(hidden_TD.index_select(0, rows_N), self.lm_head, self.training)
        loss_sum = linear_cross_entropy(h_ND, head_VD, targets_T.index_select(0, rows_N), self.loss_chunk_size)
        return loss_sum, num

    # ----------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def generate(
        self,
        prompts: Prompts,
        max_new_tokens: int,
        stop_ids: Sequence[int] | None = None,
        share_prefix: bool = True,
        min_shared_tokens: int = 32,
        prefill_chunk_tokens: int = 32_768,
    ) -> list[list[int]]:
        """Greedy decoding of a batch with a KV cache; returns the generated ids per prompt, ending with the first
        stop id when one was produced.

        `share_prefix=True`: consecutive prompts that start with the same tokens and the same patches for them
        (the questions about one image) form a group (`prefix_groups`); the shared prefix is prefilled and its K/V
        stored once per group, and every prompt of the group attends to it from its own suffix and generated
        tokens. Prefixes are prefilled in packed chunks of about `prefill_chunk_tokens` tokens.
        `share_prefix=False`: the reference path, one packed prefill of every whole prompt and a [B, H, L, K]
        cache per layer. Both give the same tokens (tests/unit/test_generate_prefix.py).
        """
        if max_new_tokens <= 0 or not prompts:
            return [[] for _ in prompts]
        if min(int(ids.shape[0]) for ids, _ in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        if prefill_chunk_tokens <= 0:
            raise ValueError(f"prefill_chunk_tokens must be positive, got {prefill_chunk_tokens}")
        device = self.embed_tokens.weight.device
        stop = torch.tensor(sorted(set(stop_ids or [])), dtype=torch.long, device=device)
        if share_prefix:
            groups = prefix_groups(prompts, self.config.image_token_id, min_shared_tokens)
            rows = self._generate_grouped(prompts, groups, max_new_tokens, stop, prefill_chunk_tokens)
        else:
            rows = self._generate_unshared(prompts, max_new_tokens, stop)
        return self._trim(rows, set(stop.tolist()))

    def _generate_unshared(
        self, prompts: Prompts, max_new_tokens: int, stop: torch.Tensor
    ) -> list[list[int]]:
        """The reference: one packed prefill of every whole prompt, then one token per step from a KV cache."""
        device = self.embed_tokens.weight.device
        backend, ops = self.resolve(device)
        lengths = [int(ids.shape[0]) for ids, _ in prompts]
        B, cap = len(prompts), max(lengths) + max_new_tokens
        cfg = self.config
        input_ids = torch.cat([ids.to(device, torch.long) for ids, _ in prompts])
        patch_list = [p for _, p in prompts if p is not None and p.shape[0]]
        patches = torch.cat([p.to(device) for p in patch_list]) if patch_list else None
        position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        sample_T = torch.repeat_interleave(torch.arange(B, device=device), torch.tensor(lengths, device=device))

        # Prefill: the packed forward, keeping each layer's k/v in a [B, H, L, K] cache (prompt i at 0..len_i-1).
        dtype = self.embed_tokens.weight.dtype
        k_cache = [torch.zeros(B, cfg.num_heads, cap, cfg.head_dim, dtype=dtype, device=device) for _ in self.layers]
        v_cache = [torch.zeros_like(k) for k in k_cache]
        x_TD = self.embed(input_ids, patches)
        cos, sin = rotary_cos_sin(position_ids, cfg.rotary_dim, cfg.rope_theta, x_TD.dtype)
        for i, layer in enumerate(self.layers):
            w = layer.weights()
            q, k, v = ops.attn_in(x_TD, w, cos, sin, cfg.num_heads, cfg.layer_norm_eps)
            k_cache[i][sample_T, :, position_ids] = k
            v_cache[i][sample_T, :, position_ids] = v
            x_TD = ops.attn_out(x_TD, packed_attention(q, k, v, cu, max(lengths), backend), w, cfg.layer_norm_eps)
        last = (cu[1:] - 1).long()
        next_B = self._greedy(x_TD.index_select(0, last))

        pos_B = torch.tensor(lengths, device=device)
        rows = torch.arange(B, device=device)
        slots_L = torch.arange(cap, device=device)
        out = [next_B]
        done_B = torch.isin(next_B, stop)
        for _ in range(max_new_tokens - 1):
            if bool(done_B.all()):  # one host sync per step decides whether to stop early
                break
            x_BD = self.embed_tokens(next_B)
            cos, sin = rotary_cos_sin(pos_B, cfg.rotary_dim, cfg.rope_theta, x_BD.dtype)
            mask_BL = slots_L[None, :] <= pos_B[:, None]
            for i, layer in enumerate(self.layers):
                w = layer.weights()
                q, k, v = ops.attn_in(x_BD, w, cos, sin, cfg.num_heads, cfg.layer_norm_eps)
                k_cache[i][rows, :, pos_B] = k
                v_cache[i][rows, :, pos_B] = v
                o = cached_attention(q[:, :, None], k_cache[i], v_cache[i], mask_BL[:, None], eager=backend == "eager")
                x_BD = ops.attn_out(x_BD, o[:, :, 0], w, cfg.layer_norm_eps)
            next_B = self._greedy(x_BD)
            out.append(next_B)
            done_B |= torch.isin(next_B, stop)
            pos_B = pos_B + 1
        return torch.stack(out, dim=1).tolist()

    # Shared-prefix decoding. Each layer's cache is [G, H, L, K], one entry per group: slots 0..P_g-1 hold the
    # group's prefix K/V once, and member j owns the region [Lp + j*region, Lp + (j+1)*region) for its suffix and
    # generated tokens (Lp = the longest prefix). Queries are laid out per group ([G, H, members (x suffix), K])
    # so one masked attention call covers [shared prefix] + [own tokens] for every row.
    def _generate_grouped(
        self,
        prompts: Prompts,
        groups: list[tuple[list[int], int]],
        max_new_tokens: int,
        stop: torch.Tensor,
        chunk_tokens: int,
    ) -> list[list[int]]:
        device = self.embed_tokens.weight.device
        backend, ops = self.resolve(device)
        lay = _group_layout(prompts, groups, max_new_tokens, self.config.image_token_id)
        cfg, dtype = self.config, self.embed_tokens.weight.dtype
        shape = (len(groups), cfg.num_heads, lay.num_slots, cfg.head_dim)
        # zeros, not empty: masked slots are still multiplied by 0 in the attention, and NaN * 0 is NaN.
        cache = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                 for _ in self.layers]
        self._prefill_prefixes(prompts, lay, cache, backend, ops, chunk_tokens)
        next_B = self._prefill_suffixes(prompts, lay, cache, backend, ops, chunk_tokens)
        return self._decode_grouped(next_B, lay, cache, backend, ops, max_new_tokens, stop)

    def _embed_segments(
        self, segments: list[tuple[torch.Tensor, torch.Tensor | None, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed embeddings of token segments (ids, their patches, first position) -> x, cos, sin, positions."""
        device = self.embed_tokens.weight.device
        input_ids = torch.cat([ids.to(device, torch.long) for ids, _, _ in segments])
        patch_list = [p for _, p, _ in segments if p is not None and p.shape[0]]
        patches = torch.cat([p.to(device) for p in patch_list]) if patch_list else None
        pos_T = torch.cat([torch.arange(s, s + ids.shape[0], device=device) for ids, _, s in segments])
        x_TD = self.embed(input_ids, patches)
        cos, sin = rotary_cos_sin(pos_T, self.config.rotary_dim, self.config.rope_theta, x_TD.dtype)
        return x_TD, cos, sin, pos_T

    def _prefill_prefixes(
        self, prompts: Prompts, lay: _GroupLayout, cache: _Cache, backend: str, ops: FusedOps, chunk_tokens: int
    ) -> None:
        """Phase 1: packed, document-causal forward of each group's shared prefix (once per group); keeps K/V only."""
        cfg, device = self.config, self.embed_tokens.weight.device
        for chunk in _chunks(lay.prefix_G, chunk_tokens):
            chunk = [g for g in chunk if lay.prefix_G[g] > 0]
            if not chunk:
                continue
            first = [prompts[lay.members_G[g][0]] for g in chunk]
            lengths = [lay.prefix_G[g] for g in chunk]
            segments = [
                (ids[:n], None if p is None else p[: lay.prefix_images_G[g]], 0)
                for (ids, p), n, g in zip(first, lengths, chunk, strict=True)
            ]
            x_TD, cos, sin, pos_T = self._embed_segments(segments)
            group_T = torch.repeat_interleave(torch.tensor(chunk, device=device), torch.tensor(lengths, device=device))
            cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
            for i, layer in enumerate(self.layers):
                w = layer.weights()
                q, k, v = ops.attn_in(x_TD, w, cos, sin, cfg.num_heads, cfg.layer_norm_eps)
                cache[i][0][group_T, :, pos_T] = k
                cache[i][1][group_T, :, pos_T] = v
                if i + 1 < len(self.layers):  # the last layer's output at prefix tokens feeds nothing
                    o_THK = packed_attention(q, k, v, cu, max(lengths), backend)
                    x_TD = ops.attn_out(x_TD, o_THK, w, cfg.layer_norm_eps)

    def _prefill_suffixes(
        self, prompts: Prompts, lay: _GroupLayout, cache: _Cache, backend: str, ops: FusedOps, chunk_tokens: int
    ) -> torch.Tensor:
        """Phase 2: every prompt's own tokens after the prefix, attending to [group prefix] + [own causal K/V].

        Returns the first generated token of every prompt [B]."""
        cfg, device, m = self.config, self.embed_tokens.weight.device, lay.num_members
        suffix_G = [sum(lay.suffix_B[b] for b in members) for members in lay.members_G]
        firsts = []
        for chunk in _chunks(suffix_G, chunk_tokens):
            g0, g1 = chunk[0], chunk[-1] + 1
            rows = [b for g in chunk for b in lay.members_G[g]]
            segments = []
            for b in rows:
                ids, p = prompts[b]
                g = lay.group_B[b]
                p = None if p is None else p[lay.prefix_images_G[g] :]
                segments.append((ids[lay.prefix_G[g] :], p, lay.prefix_G[g]))
            x_TD, cos, sin, _ = self._embed_segments(segments)
            s_max = max(lay.suffix_B[b] for b in rows)
            group_T, slot_T, query_T = _suffix_index(lay, rows, g0, s_max, device)
            mask = _suffix_mask(lay, chunk, s_max, device)
            for i, layer in enumerate(self.layers):
                w = layer.weights()
                q, k, v = ops.attn_in(x_TD, w, cos, sin, cfg.num_heads, cfg.layer_norm_eps)
                k_cache, v_cache = cache[i][0][g0:g1], cache[i][1][g0:g1]  # views: writes land in the cache
                k_cache[group_T, :, slot_T] = k
                v_cache[group_T, :, slot_T] = v
                q_GHQK = _to_groups(q, query_T, g1 - g0, m * s_max)
                o = cached_attention(q_GHQK, k_cache, v_cache, mask, eager=backend == "eager")
                x_TD = ops.attn_out(x_TD, _from_groups(o, query_T), w, cfg.layer_norm_eps)
            last_T = torch.tensor(list(itertools.accumulate(lay.suffix_B[b] for b in rows)), device=device) - 1
            firsts.append(self._greedy(x_TD.index_select(0, last_T)))
        return torch.cat(firsts)

    def _decode_grouped(
        self,
        next_B: torch.Tensor,
        lay: _GroupLayout,
        cache: _Cache,
        backend: str,
        ops: FusedOps,
        max_new_tokens: int,
        stop: torch.Tensor,
    ) -> list[list[int]]:
        """One token per step for every prompt; each row attends to its group's prefix and its own region."""
        cfg, device = self.config, self.embed_tokens.weight.device
        G, m = len(lay.members_G), lay.num_members
        group_B = torch.tensor(lay.group_B, device=device)
        flat_B = group_B * m + torch.tensor(lay.member_B, device=device)
        suffix_B = torch.tensor(lay.suffix_B, device=device)
        prefix_G = torch.tensor(lay.prefix_G, device=device)
        pos_B = prefix_G[group_B] + suffix_B  # rotary position of the token fed in
        slot_B = lay.prefix_slots + torch.tensor(lay.member_B, device=device) * lay.region + suffix_B
        # Last own slot each query may see (its region's offset); -1 marks a padding row of a smaller group.
        upto_R = torch.full((G * m,), -1, dtype=torch.long, device=device).index_put((flat_B,), suffix_B)
        start_GQ = (lay.prefix_slots + torch.arange(m, device=device) * lay.region).expand(G, m)
        out = [next_B]
        done_B = torch.isin(next_B, stop)
        for _ in range(max_new_tokens - 1):
            if bool(done_B.all()):  # one host sync per step decides whether to stop early
                break
            x_BD = self.embed_tokens(next_B)
            cos, sin = rotary_cos_sin(pos_B, cfg.rotary_dim, cfg.rope_theta, x_BD.dtype)
            mask_GQL = _grouped_mask(prefix_G, start_GQ, upto_R.view(G, m), lay.num_slots)
            for i, layer in enumerate(self.layers):
                w = layer.weights()
                q, k, v = ops.attn_in(x_BD, w, cos, sin, cfg.num_heads, cfg.layer_norm_eps)
                cache[i][0][group_B, :, slot_B] = k
                cache[i][1][group_B, :, slot_B] = v
                o = cached_attention(_to_groups(q, flat_B, G, m), *cache[i], mask_GQL, eager=backend == "eager")
                x_BD = ops.attn_out(x_BD, _from_groups(o, flat_B), w, cfg.layer_norm_eps)
            next_B = self._greedy(x_BD)
            out.append(next_B)
            done_B |= torch.isin(next_B, stop)
            pos_B, slot_B = pos_B + 1, slot_B + 1
            upto_R = torch.where(upto_R >= 0, upto_R + 1, upto_R)
        return torch.stack(out, dim=1).tolist()

    def _greedy(self, x_BD: torch.Tensor) -> torch.Tensor:
        h = nn.functional.layer_norm(
            x_BD, (x_BD.shape[-1],), self.final_layernorm.weight, self.final_layernorm.bias, self.config.layer_norm_eps
        )
        return self.lm_head(h).float().argmax(dim=-1)

    @staticmethod
    def _trim(rows: list[list[int]], stop: set[int]) -> list[list[int]]:
        out = []
        for row in rows:
            cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            out.append(row[:cut])
        return out


# ------------------------------------------------------------------------------------ shared-prefix decoding
def prefix_groups(
    prompts: Prompts, image_token_id: int, min_shared_tokens: int = 32
) -> list[tuple[list[int], int]]:
    """Runs of consecutive prompts that start with the same tokens *and* the same patches for those tokens.

    Returns `(member indices, shared prefix length)` per group, covering every prompt in order. A prompt joins the
    previous group when they share at least `min_shared_tokens` tokens and the join saves work: sharing n tokens
    saves n prefill tokens but gives each earlier member (prefix - n) more tokens of its own. A prefix always
    leaves each member at least its last token (whose logits start decoding); a group of one has prefix len - 1.
    """
    if min_shared_tokens < 1:
        raise ValueError(f"min_shared_tokens must be >= 1, got {min_shared_tokens}")
    ids_cpu = [ids.detach().to("cpu", torch.long) for ids, _ in prompts]
    for i, (ids, (_, patches)) in enumerate(zip(ids_cpu, prompts, strict=True)):
        num_images, num_patches = int((ids == image_token_id).sum()), 0 if patches is None else patches.shape[0]
        if num_images != num_patches:
            raise ValueError(f"prompt {i} has {num_images} image tokens but {num_patches} patches")
    groups: list[tuple[list[int], int]] = []
    for i, ids in enumerate(ids_cpu):
        if groups:
            members, prefix = groups[-1]
            first = members[0]
            limit = min(prefix, ids.shape[0] - 1)
            n = _shared_prefix(ids_cpu[first], prompts[first][1], ids, prompts[i][1], limit, image_token_id)
            if n >= min_shared_tokens and n > (len(members) - 1) * (prefix - n):
                groups[-1] = ([*members, i], n)
                continue
        groups.append(([i], ids.shape[0] - 1))
    return groups


def _shared_prefix(
    ids_a: torch.Tensor,
    patches_a: torch.Tensor | None,
    ids_b: torch.Tensor,
    patches_b: torch.Tensor | None,
    limit: int,
    image_token_id: int,
) -> int:
    """Length (<= limit) of the common leading tokens of two prompts whose image tokens carry equal patches."""
    n = min(limit, ids_a.shape[0], ids_b.shape[0])
    differ = (ids_a[:n] != ids_b[:n]).nonzero()
    if differ.numel():
        n = int(differ[0, 0])
    image_pos = (ids_a[:n] == image_token_id).nonzero()[:, 0]
    k = image_pos.numel()
    if k == 0 or patches_a is patches_b:  # the predictor passes one tensor for both questions of an item
        return n
    pa, pb = patches_a[:k], patches_b[:k].to(patches_a.device)
    if pa.dtype != pb.dtype:  # raw pixels vs normalised values: never taken as equal
        return int(image_pos[0])
    if torch.equal(pa, pb):
        return n
    first_diff = int((pa != pb).reshape(k, -1).any(dim=1).nonzero()[0, 0])
    return int(image_pos[first_diff])  # share up to the first image token whose patch differs


@dataclasses.dataclass
class _GroupLayout:
    """Host-side plan of a grouped cache (see `_generate_grouped`). Rows b are the prompts, in order."""

    members_G: list[list[int]]
    prefix_G: list[int]  # shared prefix length of each group
    prefix_images_G: list[int]  # image tokens (patches) inside each prefix
    group_B: list[int]
    member_B: list[int]  # index of the prompt within its group
    suffix_B: list[int]  # prompt tokens after the group's prefix (>= 1)
    num_members: int  # largest group
    prefix_slots: int  # Lp: longest prefix; member regions start here
    region: int  # slots per member: its suffix and generated tokens
    num_slots: int  # L


def _group_layout(
    prompts: Prompts, groups: list[tuple[list[int], int]], max_new_tokens: int, image_token_id: int
) -> _GroupLayout:
    lengths = [int(ids.shape[0]) for ids, _ in prompts]
    prefix_G = [p for _, p in groups]
    prefix_images_G = [int((prompts[m[0]][0][:p] == image_token_id).sum()) for m, p in groups]
    group_B, member_B = [0] * len(prompts), [0] * len(prompts)
    for g, (members, _) in enumerate(groups):
        for j, b in enumerate(members):
            group_B[b], member_B[b] = g, j
    suffix_B = [lengths[b] - prefix_G[group_B[b]] for b in range(len(prompts))]
    num_members = max(len(m) for m, _ in groups)
    region = max(suffix_B) + max_new_tokens
    used = max(prefix_G) + num_members * region
    return _GroupLayout(
        members_G=[m for m, _ in groups],
        prefix_G=prefix_G,
        prefix_images_G=prefix_images_G,
        group_B=group_B,
        member_B=member_B,
        suffix_B=suffix_B,
        num_members=num_members,
        prefix_slots=max(prefix_G),
        region=region,
        num_slots=-(-used // 16) * 16,  # a multiple of 16 keeps the attention mask aligned for fused kernels
    )


def _chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive index runs whose sizes sum to <= budget (a single larger item gets a run of its own)."""
    out: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if out and total + size <= budget:
            out[-1].append(i)
            total += size
        else:
            out.append([i])
            total = size
    return out


def _grouped_mask(
    prefix_G: torch.Tensor, start_GQ: torch.Tensor, upto_GQ: torch.Tensor, num_slots: int
) -> torch.Tensor:
    """[G, Q, L] may-attend mask: the group's prefix slots + own slots start..start+upto; a padding query
    (upto < 0) sees slot 0 only, so no row is fully masked (NaN in some kernels) — its output is dropped."""
    slot_L = torch.arange(num_slots, device=prefix_G.device)
    own = (slot_L >= start_GQ[..., None]) & (slot_L <= (start_GQ + upto_GQ)[..., None])
    shared = slot_L < prefix_G[:, None, None]
    return torch.where((upto_GQ >= 0)[..., None], own | shared, slot_L == 0)


def _suffix_index(
    lay: _GroupLayout, rows: list[int], g0: int, s_max: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """For each suffix token of `rows` (packed): its group (relative to g0), cache slot, and query slot."""
    m = lay.num_members
    group, slot, query = [], [], []
    for b in rows:
        g, j, n = lay.group_B[b] - g0, lay.member_B[b], lay.suffix_B[b]
        group += [g] * n
        start = lay.prefix_slots + j * lay.region
        slot += range(start, start + n)
        query += range((g * m + j) * s_max, (g * m + j) * s_max + n)
    return tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (group, slot, query))


def _suffix_mask(lay: _GroupLayout, chunk: list[int], s_max: int, device: torch.device) -> torch.Tensor:
    """[Gc, m * s_max, L]: query (j, s) of group g sees g's prefix and member j's slots up to its own (causal)."""
    m = lay.num_members
    suffix_GM = torch.zeros(len(chunk), m, dtype=torch.long)
    for gi, g in enumerate(chunk):
        for j, b in enumerate(lay.members_G[g]):
            suffix_GM[gi, j] = lay.suffix_B[b]
    s_S = torch.arange(s_max)
    upto_GMS = torch.where(s_S < suffix_GM[..., None], s_S, -1)
    start_GMS = (lay.prefix_slots + torch.arange(m) * lay.region)[:, None].expand(m, s_max)
    prefix_G = torch.tensor([lay.prefix_G[g] for g in chunk])
    mask = _grouped_mask(prefix_G, start_GMS.reshape(1, m * s_max), upto_GMS.reshape(len(chunk), m * s_max),
                         lay.num_slots)
    return mask.to(device)


def _to_groups(x_THK: torch.Tensor, index_T: torch.Tensor, G: int, Q: int) -> torch.Tensor:
    """Packed rows -> [G, H, Q, K] query blocks (zero rows where a group has fewer queries)."""
    if x_THK.shape[0] != G * Q:
        x_THK = x_THK.new_zeros(G * Q, *x_THK.shape[1:]).index_copy_(0, index_T, x_THK)
    # else: the indices are increasing and cover every slot, so the rows are already in place
    return x_THK.view(G, Q, *x_THK.shape[1:]).transpose(1, 2)


def _from_groups(o_GHQK: torch.Tensor, index_T: torch.Tensor) -> torch.Tensor:
    G, H, Q, K = o_GHQK.shape
    o = o_GHQK.transpose(1, 2).reshape(G * Q, H, K)
    return o if index_T.shape[0] == G * Q else o.index_select(0, index_T)


def build_model(
    model_cfg: Any,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tokenizer: Any = None,
) -> FuyuForCausalLM:
    """Build from `otterhd_ray.config.ModelConfig`: weights from `model_cfg.path` when set, else random init."""
    from otterhd_ray.models.fuyu.config import config_for_tokenizer, flavour_config

    fused = model_cfg.fused_ops
    if model_cfg.compile and fused in ("auto", "none"):
        # `compile` means the torch.compile regions around attention (the glue of every layer).
        fused = "compile"
    switches = dict(
        attention=model_cfg.attention,
        fused_ops=fused,
        activation_checkpointing=model_cfg.activation_checkpointing,
        loss_chunk_size=model_cfg.loss_chunk_size,
        selective_every=model_cfg.selective_every,
    )
    if model_cfg.path:
        from otterhd_ray.models.fuyu.hf import load_hf

        model = load_hf(
            model_cfg.path, dtype=dtype, device=device, allow_pickle=model_cfg.allow_pickle,
            num_layers=model_cfg.num_layers, **switches,
        )
    else:
        cfg = flavour_config(model_cfg.flavour)
        if model_cfg.num_layers:
            cfg = cfg.replace(num_layers=model_cfg.num_layers)
        if tokenizer is not None:
            cfg = config_for_tokenizer(cfg, tokenizer)
        model = new_model(cfg, dtype=dtype, device=device, **switches)
    model.resolve(device)  # fail at build time, not at the first step, when a backend cannot run here
    return model


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
