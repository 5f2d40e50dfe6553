"""How a decoder layer attends: the strategy object the one layer forward (`FuyuForCausalLM.decoder`) takes.

- `PackedAttention`: document-causal attention within each sample of a packed row (training and every prefill);
  given a `KVCache` it also stores each layer's K/V there.
- `CachedAttention`: queries attend to the slots of a `KVCache` under a boolean mask after storing their own K/V
  (every decode step, and the suffix prefill of shared-prefix decoding).

A strategy is called once per layer with the layer index and that layer's q, k, v [T, H, K] and returns the
attention output [T, H, K] — or None when the layer's output feeds nothing (the last layer of a shared prefix,
whose K/V is all that is kept): the layer then skips its output projection and MLP.

Legend: T tokens, H heads, K head dim, N cache rows, L cache slots, G query groups, Q queries per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from otterhd_ray.ops.attention import cached_attention, packed_attention


class LayerAttention(Protocol):
    def __call__(
        self, layer: int, q_THK: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor
    ) -> torch.Tensor | None: ...


@dataclass
class KVCache:
    """Per-layer keys and values, [N, H, L, K] each. Token t of a write lands at (row_T[t], slot_T[t])."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def zeros(
        cls, num_layers: int, shape_NHLK: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        # zeros, not empty: masked slots are still multiplied by 0 in the attention, and NaN * 0 is NaN.
        return cls(
            [torch.zeros(shape_NHLK, dtype=dtype, device=device) for _ in range(num_layers)],
            [torch.zeros(shape_NHLK, dtype=dtype, device=device) for _ in range(num_layers)],
        )

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as views: writes land in this cache."""
        return KVCache([k[start:stop] for k in self.k], [v[start:stop] for v in self.v])

    def write(
        self, layer: int, row_T: torch.Tensor, slot_T: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor
    ) -> None:
        self.k[layer][row_T, :, slot_T] = k_THK
        self.v[layer][row_T, :, slot_T] = v_THK


@dataclass
class PackedAttention:
    """Causal attention within each sample of a packed row (`cu_seqlens` bounds; `backend` already resolved).

    With `cache`, token t's K/V is also stored at (row_T[t], slot_T[t]); `last_layer_output=False` makes the
    last layer store its K/V only (a shared prefix, whose hidden states after the last layer feed nothing)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    backend: str
    cache: KVCache | None = None
    row_T: torch.Tensor | None = None
    slot_T: torch.Tensor | None = None
    last_layer_output: bool = True

    def __call__(
        self, layer: int, q_THK: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor
    ) -> torch.Tensor | None:
        if self.cache is not None:
            self.cache.write(layer, self.row_T, self.slot_T, k_THK, v_THK)
            if not self.last_layer_output and layer == self.cache.num_layers - 1:
                return None
        return packed_attention(q_THK, k_THK, v_THK, self.cu_seqlens, self.max_seqlen, self.backend)


@dataclass
class CachedAttention:
    """Store the tokens' K/V at (row_T, slot_T), then attend over the cache under `mask_GQL` (True = may attend).

    The queries are laid out as G groups of Q (token t is query `query_T[t]` of that layout, group g attends to
    cache row g): one query per row for plain decoding, a group's members (x their suffix tokens) for the shared-
    prefix cache. `eager` picks the explicit-softmax reference over SDPA."""

    cache: KVCache
    row_T: torch.Tensor
    slot_T: torch.Tensor
    query_T: torch.Tensor
    mask_GQL: torch.Tensor
    eager: bool = False

    def __call__(self, layer: int, q_THK: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.row_T, self.slot_T, k_THK, v_THK)
        G, Q = self.mask_GQL.shape[:2]
        q_GHQK = to_groups(q_THK, self.query_T, G, Q)
        o_GHQK = cached_attention(q_GHQK, self.cache.k[layer], self.cache.v[layer], self.mask_GQL, eager=self.eager)
        return from_groups(o_GHQK, self.query_T)


def to_groups(x_THK: torch.Tensor, index_T: torch.Tensor, G: int, Q: int) -> torch.Tensor:
    """Packed rows -> [G, H, Q, K] query blocks (zero rows where a group has fewer queries)."""
    if x_THK.shape[0] != G * Q:
        x_THK = x_THK.new_zeros(G * Q, *x_THK.shape[1:]).index_copy_(0, index_T, x_THK)
    # else: the indices are increasing and cover every slot, so the rows are already in place
    return x_THK.view(G, Q, *x_THK.shape[1:]).transpose(1, 2)


def from_groups(o_GHQK: torch.Tensor, index_T: torch.Tensor) -> torch.Tensor:
    G, H, Q, K = o_GHQK.shape
    o = o_GHQK.transpose(1, 2).reshape(G * Q, H, K)
    return o if index_T.shape[0] == G * Q else o.index_select(0, index_T)
