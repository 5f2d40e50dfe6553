"""What several test files share: synthetic Fuyu samples, the reference packer, and the ../shared fixtures.

Import as `from tests.helpers import ...` (pyproject's pytest `pythonpath` puts the repository root on the path).

Shapes: T tokens of one sample, P its image patches, D = 30*30*3 patch values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest
import torch

from otterhd_ray.models.fuyu.inputs import PackedBatch

if TYPE_CHECKING:
    from otterhd_ray.data.pipeline import MicroBatch

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI copies shared/ next to its clone; on a workstation it sits beside the checkout too.
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
IGNORE = -100  # the loss's ignore index (docs/internals.md)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def shared_fixture(*parts: str) -> Path:
    """`../shared/fixtures/<parts>`. Missing: the calling test is skipped, or fails under `CI=true` (CI must
    never go green because its fixtures were not copied). Call it inside a test or fixture, not at import."""
    path = SHARED_FIXTURES.joinpath(*parts)
    if not path.exists():
        message = f"shared fixture missing: {path} (copy ../shared beside the checkout)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


class Sample(NamedTuple):
    """One sample in Fuyu's layout: rows x (cols |SPEAKER| + |NEWLINE|), then <s> and text."""

    input_ids: torch.Tensor  # (T,) int64
    patches: torch.Tensor  # (P, D) uint8, one per |SPEAKER|
    labels: torch.Tensor  # (T,) int64: the token on supervised positions, IGNORE elsewhere


def sample(cfg: Any, rows: int, cols: int, num_text: int, seed: int, num_targets: int = 3) -> Sample:
    """A random sample for model config `cfg` (`image_token_id`, its newline id + 1, `bos_token_id`,
    `patch_dim`); the last `num_targets` tokens are supervised."""
    g = torch.Generator().manual_seed(seed)
    image = ([cfg.image_token_id] * cols + [cfg.image_token_id + 1]) * rows
    text = torch.randint(3, cfg.image_token_id, (num_text,), generator=g).tolist()
    ids_T = torch.tensor(image + [cfg.bos_token_id] + text, dtype=torch.long)
    patches_PD = torch.randint(0, 256, (rows * cols, cfg.patch_dim), dtype=torch.uint8, generator=g)
    labels_T = torch.full_like(ids_T, IGNORE)
    if num_targets:
        labels_T[-num_targets:] = ids_T[-num_targets:]
    return Sample(ids_T, patches_PD, labels_T)


def questions(cfg: Any, rows: int, cols: int, num: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`num` prompts about one image (one patches tensor, as the predictor passes): image, <s>, common text,
    then a question of its own (lengths differ) — the shared-prefix decoding tests' groups."""
    g = torch.Generator().manual_seed(seed)
    patches_PD = torch.randint(0, 256, (rows * cols, cfg.patch_dim), dtype=torch.uint8, generator=g)
    image = ([cfg.image_token_id] * cols + [cfg.image_token_id + 1]) * rows
    head = image + [cfg.bos_token_id] + torch.randint(3, cfg.image_token_id, (3,), generator=g).tolist()
    own = [torch.randint(3, cfg.image_token_id, (2 + 3 * q,), generator=g).tolist() for q in range(num)]
    return [(torch.tensor(head + tail), patches_PD) for tail in own]


def pack(samples: list[Sample], device: torch.device | str | None = None) -> PackedBatch:
    """The packed micro-batch of docs/internals.md, written out independently of the data layer (the model
    tests' oracle): targets shifted within each sample, positions restarting per sample."""
    lengths = [len(s.input_ids) for s in samples]
    targets = []
    for s in samples:
        t = torch.full_like(s.labels, IGNORE)
        t[:-1] = s.labels[1:]
        targets.append(t)
    target_ids = torch.cat(targets)
    batch = PackedBatch(
        input_ids=torch.cat([s.input_ids for s in samples]),
        target_ids=target_ids,
        position_ids=torch.cat([torch.arange(n) for n in lengths]),
        cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
        max_seqlen=max(lengths),
        patches=torch.cat([s.patches for s in samples]),
        num_target_tokens=int((target_ids != IGNORE).sum()),
    )
    return batch if device is None else batch.to(device)


def micro_batch(samples: list[Sample], first_index: int, epoch: int = 0, position: int = 0) -> MicroBatch:
    """`pack(samples)` as a data source yields it: sample indices `first_index, first_index + 1, ...`."""
    from otterhd_ray.data.pipeline import MicroBatch  # the data stack, only for the tests that need it

    indices = list(range(first_index, first_index + len(samples)))
    return MicroBatch(pack(samples), torch.tensor(indices), tuple(f"s{i}" for i in indices), epoch, position)


def as_row(s: Sample, index: int) -> dict[str, Any]:
    """`s` as a preprocessed row (numpy), the form the data layer's packer (`assemble`, `collate`) takes."""
    return {"id": f"s{index}", "input_ids": s.input_ids.numpy(), "labels": s.labels.numpy(),
            "patches": s.patches.numpy(), "sample_index": index}


def train_rows(cfg: Any, seed: int) -> list[dict[str, Any]]:
    """Three rows of different image shapes and supervised counts (the engine and data-parallel tests)."""
    shapes = [(2, 3, 9), (1, 4, 13), (3, 2, 6)]
    return [as_row(sample(cfg, r, c, t, seed + i, num_targets=t // 2 + 1), i) for i, (r, c, t) in enumerate(shapes)]


def reset_distributed() -> None:
    """Tear down a 1-rank gloo group DeepSpeed made in this process, and DeepSpeed's caches of it (its cached
    world-group clone outlives `destroy_process_group` and breaks the next module's `deepspeed.initialize`).
    For module fixtures of in-process DeepSpeed tests, before and after."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups

    ds_comm.cdb = None
    ds_groups._WORLD_GROUP = None


# ------------------------------------------------------------------------------------------------ training data
def synth_train_dir(root: Path, **synth: Any) -> Path:
    """Synthetic shards under `root/train` (+ benchmark when asked) and the tiny tokenizer under `root/tokenizer`:
    the data of the in-process and Ray training tests (`synth`: `otterhd_ray.data.synth.synthesize` keywords)."""
    from otterhd_ray.data.synth import synthesize
    from otterhd_ray.data.tokenizer import build_tiny_tokenizer

    synthesize(root, **synth)
    build_tiny_tokenizer(root / "tokenizer")
    return root


def data_overrides(data_dir: Path) -> list[str]:
    """The `data.*` overrides that point a fine-tune config at `synth_train_dir`'s shards, tokenizer and cache."""
    return [f"data.datasets=[{{name: synth, path: {data_dir / 'train'}}}]",
            f"data.tokenizer_path={data_dir / 'tokenizer'}", f"data.index_cache_dir={data_dir / 'index'}"]


# ------------------------------------------------------------------------------------------------ GPU tests
def wide_debug_config() -> Any:
    """The debug layout widened so the bf16 kernels take their real paths (head dim 64 like Fuyu-8B)."""
    from otterhd_ray.models.fuyu import flavour_config

    return flavour_config("debug").replace(hidden_size=256, intermediate_size=1024, num_heads=4, num_layers=3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of `a` against `b`, in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
