"""Decoding with a KV cache: the reference (unshared) path, the grouped shared-prefix cache, greedy and sampled.

`stream_generate` is the engine: prefill, then one token per step for every prompt, yielded as it is produced.
`generate` (and `FuyuForCausalLM.generate`, a thin wrapper) collects its greedy output per prompt. Every phase
runs the model's one layer loop (`decoder`) with an attention strategy from `models/fuyu/attention.py`:

- unshared (`share_prefix=False`, the reference): one packed prefill of every whole prompt filling a [B, H, L, K]
  cache per layer, then decode steps attending over it;
- shared prefix (`share_prefix=True`): consecutive prompts that start with the same tokens and the same patches
  for them (the questions about one image) form a group (`prefix_groups`). Each layer's cache is [G, H, L, K],
  one entry per group: slots 0..P_g-1 hold the group's prefix K/V once, and member j owns the region
  [Lp + j*region, Lp + (j+1)*region) for its suffix and generated tokens (Lp = the longest prefix). Queries are
  laid out per group ([G, H, members (x suffix), K]) so one masked attention call covers [shared prefix] + [own
  tokens] for every row. Prefixes, then suffixes, are prefilled in packed chunks of about
  `prefill_chunk_tokens` tokens.

Both paths give the same tokens (tests/unit/test_generate_prefix.py); the unshared one equals transformers'
greedy `generate` (tests/parity/test_model_parity.py). This module never imports the model: it sees it through
the `Decoder` protocol.

Legend: B prompts, T packed tokens, D hidden, V vocabulary, L cache slots, G prompt groups, Q queries per group.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Protocol

import torch
import torch.nn as nn

from otterhd_ray.models.fuyu.attention import CachedAttention, KVCache, LayerAttention, PackedAttention
from otterhd_ray.models.fuyu.config import FuyuModelConfig
from otterhd_ray.ops.fused import FusedOps

# Decoding input: (input_ids int64 [T], patches [P, C] or None) per prompt.
Prompts = Sequence[tuple[torch.Tensor, torch.Tensor | None]]
__all__ = ["Decoder", "Prompts", "SamplingParams", "generate", "prefix_groups", "stream_generate"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one prompt is continued. `temperature=0` is greedy (argmax: exactly `generate`'s tokens); above 0 the
    logits are divided by it, cut to the nucleus of mass `top_p` and sampled with the row's own generator, so the
    same `seed` and prompt give the same tokens whatever else is in the batch (`seed=None`: a random one).
    The row ends after one of `stop_ids` (which is emitted) or after `max_new_tokens` tokens."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_ids", frozenset(int(t) for t in self.stop_ids))


class Decoder(Protocol):
    """What decoding needs from a model (`FuyuForCausalLM` provides it)."""

    config: FuyuModelConfig
    embed_tokens: nn.Embedding
    layers: nn.ModuleList

    def resolve(self, device: torch.device | str, dtype: torch.dtype | None = None) -> tuple[str, FusedOps]: ...
    def embed(self, input_ids_T: torch.Tensor, patches_PC: torch.Tensor | None) -> torch.Tensor: ...
    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...
    def decoder(
        self, x_TD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor, attention: LayerAttention
    ) -> torch.Tensor: ...
    def next_token_logits(self, x_BD: torch.Tensor) -> torch.Tensor: ...


# ------------------------------------------------------------------------------------------------- API
def generate(
    model: Decoder,
    prompts: Prompts,
    max_new_tokens: int,
    stop_ids: Sequence[int] | None = None,
    share_prefix: bool = True,
    min_shared_tokens: int = 32,
    prefill_chunk_tokens: int = 32_768,
) -> list[list[int]]:
    """Greedy decoding of a batch; returns the generated ids per prompt, ending with the first stop id when one
    was produced (`stream_generate` with greedy `SamplingParams`, collected)."""
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    params = [SamplingParams(max_new_tokens, stop_ids=frozenset(stop_ids or ()))] * len(prompts)
    rows: list[list[int]] = [[] for _ in prompts]
    steps = stream_generate(
        model, prompts, params, share_prefix=share_prefix, min_shared_tokens=min_shared_tokens,
        prefill_chunk_tokens=prefill_chunk_tokens,
    )
    for step in steps:
        for b, token in step:
            rows[b].append(token)
    return rows


def stream_generate(
    model: Decoder,
    prompts: Prompts,
    params: Sequence[SamplingParams],
    *,
    share_prefix: bool = True,
    cancelled: Container[int] | None = None,
    min_shared_tokens: int = 32,
    prefill_chunk_tokens: int = 32_768,
) -> Iterator[list[tuple[int, int]]]:
    """Yields once per decode step the (prompt_index, token_id) pairs produced at that step. The first yield
    comes right after prefill (the first token of every row). A row ends after emitting one of its stop ids
    (the stop id IS yielded, like generate's output includes it) or after max_new_tokens; rows whose index is
    in `cancelled` (checked before each step; the caller may add to it while iterating) end early. The
    iterator ends when every row has ended.

    Arguments are checked here, before the first step (ValueError). One host sync per step (the step's tokens),
    taken after the next step is queued, so host-side work on a step's tokens overlaps the device's next step.
    """
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    if prompts and min(int(ids.shape[0]) for ids, _ in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    if prefill_chunk_tokens <= 0:
        raise ValueError(f"prefill_chunk_tokens must be positive, got {prefill_chunk_tokens}")
    groups = prefix_groups(prompts, model.config.image_token_id, min_shared_tokens) if share_prefix else None
    # `cancelled` is kept as given (never `cancelled or ()`: an empty set the caller fills later must stay live)
    return _stream(model, prompts, params, groups, () if cancelled is None else cancelled, prefill_chunk_tokens)


@torch.no_grad()  # on a generator function: grad mode is set around each step only, never leaked to the caller
def _stream(
    model: Decoder,
    prompts: Prompts,
    params: Sequence[SamplingParams],
    groups: list[tuple[list[int], int]] | None,
    cancelled: Container[int],
    chunk_tokens: int,
) -> Iterator[list[tuple[int, int]]]:
    ended = [p.max_new_tokens == 0 or b in cancelled for b, p in enumerate(params)]
    if all(ended):
        return
    budget = max(p.max_new_tokens for p in params)
    if groups is None:
        decoding: _UnsharedDecoding | _GroupedDecoding = _UnsharedDecoding(model, prompts, budget)
    else:
        decoding = _GroupedDecoding(model, prompts, groups, budget, chunk_tokens)
    sample = _Sampler(params, model.embed_tokens.weight.device)
    num_emitted = [0] * len(prompts)
    next_B = sample(decoding.prefill())
    ahead = _queues_ahead(next_B.device)
    while True:
        tokens_B = _to_host(next_B)
        # On an asynchronous device, queue the next step before waiting for this one's tokens: the device computes
        # it while the host hands the tokens out (and the caller detokenises and streams them). Not queued when
        # every row reaches its budget here; a step is computed in vain only when the last rows end on a stop id
        # or a cancel.
        if ahead and any(not e and num_emitted[b] + 1 < params[b].max_new_tokens for b, e in enumerate(ended)):
            upcoming_B = sample(decoding.step(next_B))
        out = []
        for b, token in enumerate(tokens_B()):  # the step's one host sync (this step's tokens only)
            if ended[b]:
                continue
            out.append((b, token))
            num_emitted[b] += 1
            ended[b] = token in params[b].stop_ids or num_emitted[b] >= params[b].max_new_tokens
        yield out
        ended = [e or b in cancelled for b, e in enumerate(ended)]
        if all(ended):
            return
        # queued above when ahead: a row still going had room for another token
        next_B = upcoming_B if ahead else sample(decoding.step(next_B))


def _queues_ahead(device: torch.device) -> bool:
    """Queue a step ahead only where kernels run asynchronously: on CPU it would only delay the yield."""
    return device.type == "cuda"


def _to_host(x_B: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying `x_B` to the host; the returned function waits for that copy only, not for work queued after
    it (a CUDA event after a copy into pinned memory; on CPU the values are read at once)."""
    if x_B.device.type != "cuda":
        values = x_B.tolist()
        return lambda: values
    host_B = x_B.to("cpu", non_blocking=True)  # pinned destination: the copy is asynchronous
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[int]:
        copied.synchronize()
        return host_B.tolist()

    return wait


class _Sampler:
    """Next token of every row from float32 logits [B, V]: argmax for greedy rows; for the others temperature,
    nucleus (`top_p`) and one draw from the row's own generator."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device) -> None:
        self.rows = [b for b, p in enumerate(params) if p.temperature > 0]
        sampled = [params[b] for b in self.rows]
        self.rows_S = torch.tensor(self.rows, dtype=torch.long, device=device)
        self.temperature_S = torch.tensor([p.temperature for p in sampled], dtype=torch.float32, device=device)
        self.top_p_S = torch.tensor([p.top_p for p in sampled], dtype=torch.float32, device=device)
        self.generators = []
        for p in sampled:
            g = torch.Generator(device=device)
            if p.seed is None:
                g.seed()
            else:
                g.manual_seed(p.seed)
            self.generators.append(g)

    def __call__(self, logits_BV: torch.Tensor) -> torch.Tensor:
        next_B = logits_BV.argmax(dim=-1)
        if not self.rows:
            return next_B
        probs_SV = torch.softmax(logits_BV.index_select(0, self.rows_S) / self.temperature_S[:, None], dim=-1)
        probs_SV = _nucleus(probs_SV, self.top_p_S)
        drawn = [torch.multinomial(probs_SV[s], 1, generator=g) for s, g in enumerate(self.generators)]
        return next_B.index_copy(0, self.rows_S, torch.cat(drawn))


def _nucleus(probs_SV: torch.Tensor, top_p_S: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the smallest most-probable set of mass >= top_p (the top token always stays)."""
    sorted_SV, order_SV = probs_SV.sort(dim=-1, descending=True)
    before_SV = sorted_SV.cumsum(dim=-1) - sorted_SV  # mass of the more probable tokens
    # top_p = 1 keeps everything (the cumulative sum can round past 1.0 and would drop the tail)
    drop_SV = (before_SV > top_p_S[:, None]) & (top_p_S < 1.0)[:, None]
    return torch.zeros_like(probs_SV).scatter_(-1, order_SV, sorted_SV.masked_fill(drop_SV, 0.0))


# ------------------------------------------------------------------------------------------ decoding paths
class _UnsharedDecoding:
    """The reference: one packed prefill of every whole prompt, then one token per step from a [B, H, L, K]
    cache per layer (prompt b at slots 0..len_b-1, its generated tokens after)."""

    def __init__(self, model: Decoder, prompts: Prompts, max_new_tokens: int) -> None:
        self.model, self.prompts = model, prompts
        self.device = model.embed_tokens.weight.device
        self.backend, _ = model.resolve(self.device)
        self.lengths = [int(ids.shape[0]) for ids, _ in prompts]
        cfg, B, cap = model.config, len(prompts), max(self.lengths) + max_new_tokens
        shape = (B, cfg.num_heads, cap, cfg.head_dim)
        self.cache = KVCache.zeros(len(model.layers), shape, model.embed_tokens.weight.dtype, self.device)
        self.pos_B = torch.tensor(self.lengths, device=self.device)  # slot (= rotary position) of the next token
        self.rows_B = torch.arange(B, device=self.device)
        self.slots_L = torch.arange(cap, device=self.device)

    def prefill(self) -> torch.Tensor:
        """The packed forward of every prompt, keeping each layer's K/V; the logits at each prompt's end [B, V]."""
        device, lengths = self.device, self.lengths
        input_ids = torch.cat([ids.to(device, torch.long) for ids, _ in self.prompts])
        patch_list = [p for _, p in self.prompts if p is not None and p.shape[0]]
        patches = torch.cat([p.to(device) for p in patch_list]) if patch_list else None
        position_ids = torch.cat([torch.arange(n, device=device) for n in lengths])
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        sample_T = torch.repeat_interleave(self.rows_B, torch.tensor(lengths, device=device))
        x_TD = self.model.embed(input_ids, patches)
        cos, sin = self.model.rotary(position_ids, x_TD.dtype)
        attention = PackedAttention(cu, max(lengths), self.backend, self.cache, sample_T, position_ids)
        x_TD = self.model.decoder(x_TD, cos, sin, attention)
        return self.model.next_token_logits(x_TD.index_select(0, (cu[1:] - 1).long()))

    def step(self, next_B: torch.Tensor) -> torch.Tensor:
        """Feed one token per prompt; the logits after it [B, V]."""
        x_BD = self.model.embed_tokens(next_B)
        cos, sin = self.model.rotary(self.pos_B, x_BD.dtype)
        mask_B1L = (self.slots_L[None, :] <= self.pos_B[:, None])[:, None]
        attention = CachedAttention(
            self.cache, self.rows_B, self.pos_B, self.rows_B, mask_B1L, eager=self.backend == "eager"
        )
        x_BD = self.model.decoder(x_BD, cos, sin, attention)
        self.pos_B = self.pos_B + 1
        return self.model.next_token_logits(x_BD)


class _GroupedDecoding:
    """Shared-prefix decoding over the grouped cache (module doc): prefixes once per group, then every prompt's
    suffix, then one token per step for every prompt."""

    def __init__(
        self,
        model: Decoder,
        prompts: Prompts,
        groups: list[tuple[list[int], int]],
        max_new_tokens: int,
        chunk_tokens: int,
    ) -> None:
        self.model, self.prompts, self.chunk_tokens = model, prompts, chunk_tokens
        self.device = device = model.embed_tokens.weight.device
        self.backend, _ = model.resolve(device)
        cfg = model.config
        self.lay = lay = _group_layout(prompts, groups, max_new_tokens, cfg.image_token_id)
        shape = (len(groups), cfg.num_heads, lay.num_slots, cfg.head_dim)
        self.cache = KVCache.zeros(len(model.layers), shape, model.embed_tokens.weight.dtype, device)
        # Decode state, one entry per prompt: its group and flat query index, the rotary position and cache slot
        # of the token fed in, and the last own slot each query may see (its region's offset; -1 marks a padding
        # query of a smaller group).
        G, m = len(lay.members_G), lay.num_members
        suffix_B = torch.tensor(lay.suffix_B, device=device)
        member_B = torch.tensor(lay.member_B, device=device)
        self.group_B = torch.tensor(lay.group_B, device=device)
        self.flat_B = self.group_B * m + member_B
        self.prefix_G = torch.tensor(lay.prefix_G, device=device)
        self.pos_B = self.prefix_G[self.group_B] + suffix_B
        self.slot_B = lay.prefix_slots + member_B * lay.region + suffix_B
        self.upto_R = torch.full((G * m,), -1, dtype=torch.long, device=device).index_put((self.flat_B,), suffix_B)
        self.start_GQ = (lay.prefix_slots + torch.arange(m, device=device) * lay.region).expand(G, m)

    def prefill(self) -> torch.Tensor:
        self._prefill_prefixes()
        return self._prefill_suffixes()

    def _embed_segments(
        self, segments: list[tuple[torch.Tensor, torch.Tensor | None, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed embeddings of token segments (ids, their patches, first position) -> x, cos, sin, positions."""
        device = self.device
        input_ids = torch.cat([ids.to(device, torch.long) for ids, _, _ in segments])
        patch_list = [p for _, p, _ in segments if p is not None and p.shape[0]]
        patches = torch.cat([p.to(device) for p in patch_list]) if patch_list else None
        pos_T = torch.cat([torch.arange(s, s + ids.shape[0], device=device) for ids, _, s in segments])
        x_TD = self.model.embed(input_ids, patches)
        cos, sin = self.model.rotary(pos_T, x_TD.dtype)
        return x_TD, cos, sin, pos_T

    def _prefill_prefixes(self) -> None:
        """Phase 1: packed, document-causal forward of each group's shared prefix (once per group); keeps K/V only."""
        lay, device = self.lay, self.device
        for chunk in _chunks(lay.prefix_G, self.chunk_tokens):
            chunk = [g for g in chunk if lay.prefix_G[g] > 0]
            if not chunk:
                continue
            first = [self.prompts[lay.members_G[g][0]] for g in chunk]
            lengths = [lay.prefix_G[g] for g in chunk]
            segments = [
                (ids[:n], None if p is None else p[: lay.prefix_images_G[g]], 0)
                for (ids, p), n, g in zip(first, lengths, chunk, strict=True)
            ]
            x_TD, cos, sin, pos_T = self._embed_segments(segments)
            group_T = torch.repeat_interleave(torch.tensor(chunk, device=device), torch.tensor(lengths, device=device))
            cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
            attention = PackedAttention(
                cu, max(lengths), self.backend, self.cache, group_T, pos_T, last_layer_output=False
            )
            self.model.decoder(x_TD, cos, sin, attention)

    def _prefill_suffixes(self) -> torch.Tensor:
        """Phase 2: every prompt's own tokens after the prefix, attending to [group prefix] + [own causal K/V].

        Returns the logits at every prompt's last token [B, V]."""
        lay, device = self.lay, self.device
        suffix_G = [sum(lay.suffix_B[b] for b in members) for members in lay.members_G]
        logits = []
        for chunk in _chunks(suffix_G, self.chunk_tokens):
            g0, g1 = chunk[0], chunk[-1] + 1
            rows = [b for g in chunk for b in lay.members_G[g]]
            segments = []
            for b in rows:
                ids, p = self.prompts[b]
                g = lay.group_B[b]
                p = None if p is None else p[lay.prefix_images_G[g] :]
                segments.append((ids[lay.prefix_G[g] :], p, lay.prefix_G[g]))
            x_TD, cos, sin, _ = self._embed_segments(segments)
            s_max = max(lay.suffix_B[b] for b in rows)
            group_T, slot_T, query_T = _suffix_index(lay, rows, g0, s_max, device)
            mask = _suffix_mask(lay, chunk, s_max, device)
            cache = self.cache.rows(g0, g1)  # views: writes land in the cache
            attention = CachedAttention(cache, group_T, slot_T, query_T, mask, eager=self.backend == "eager")
            x_TD = self.model.decoder(x_TD, cos, sin, attention)
            last_T = torch.tensor(list(itertools.accumulate(lay.suffix_B[b] for b in rows)), device=device) - 1
            logits.append(self.model.next_token_logits(x_TD.index_select(0, last_T)))
        return torch.cat(logits)

    def step(self, next_B: torch.Tensor) -> torch.Tensor:
        """Feed one token per prompt (each attends to its group's prefix and its own region); logits [B, V]."""
        lay = self.lay
        G, m = len(lay.members_G), lay.num_members
        x_BD = self.model.embed_tokens(next_B)
        cos, sin = self.model.rotary(self.pos_B, x_BD.dtype)
        mask_GQL = _grouped_mask(self.prefix_G, self.start_GQ, self.upto_R.view(G, m), lay.num_slots)
        attention = CachedAttention(
            self.cache, self.group_B, self.slot_B, self.flat_B, mask_GQL, eager=self.backend == "eager"
        )
        x_BD = self.model.decoder(x_BD, cos, sin, attention)
        self.pos_B, self.slot_B = self.pos_B + 1, self.slot_B + 1
        self.upto_R = torch.where(self.upto_R >= 0, self.upto_R + 1, self.upto_R)
        return self.model.next_token_logits(x_BD)


# ------------------------------------------------------------------------------------- shared-prefix plan
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


