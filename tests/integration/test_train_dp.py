"""Data parallelism gives the same update as one big batch, with *unequal* supervised tokens per rank.

Two gloo processes (torch.multiprocessing, no Ray) run the loop's own `_train_step`: rank 0 holds one sample,
rank 1 two, so a per-rank mean loss would weight rank 0's tokens more. Normalising by the step's global token
count (docs/internals.md) must reproduce the single-process step on the packed batch of all three samples.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from otterhd_ray.config import FinetuneConfig
from otterhd_ray.data.buckets import assemble
from otterhd_ray.data.pipeline import MicroBatch, collate
from otterhd_ray.models.fuyu import flavour_config, new_model
from tests.helpers import train_rows

pytestmark = pytest.mark.timeout(240)
CFG = flavour_config("debug")
ENGINES = {
    "ddp": {"deepspeed": {"enabled": False}},
    "zero2": {"deepspeed": {"enabled": True, "stage": 2, "torch_adam": True}},
}


def _config(name: str) -> FinetuneConfig:
    # eps=1 keeps Adam's first update ~linear in the gradient (see test_train_local.py)
    return FinetuneConfig.model_validate({
        **ENGINES[name], "optim": {"lr": 1e-2, "weight_decay": 0.1, "warmup_ratio": 0.0, "eps": 1.0},
        "train": {"precision": "fp32"},
    })


def _step(name: str, batches: list[MicroBatch], world: int) -> dict[str, torch.Tensor]:
    from otterhd_ray.train.engine import build_engine
    from otterhd_ray.train.loop import _train_step
    from otterhd_ray.train.metrics import WindowAccumulator

    torch.manual_seed(0)
    model = new_model(CFG, attention="eager")
    engine = build_engine(model, _config(name), 10, torch.device("cpu"), world)
    _train_step(engine, batches, WindowAccumulator(torch.device("cpu")), world, torch.device("cpu"))
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def _worker(rank: int, name: str, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    rows = train_rows(CFG, seed=7)
    mine = [collate(rows[:1] if rank == 0 else rows[1:], epoch=0, position=0)]
    state = _step(name, mine, world=2)
    if rank == 0:
        torch.save(state, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("name", list(ENGINES))
def test_two_ranks_with_unequal_tokens_equal_one_big_batch(name, tmp_path: Path):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".venv" / "torch_extensions"))
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(name, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    distributed = torch.load(out)
    samples = train_rows(CFG, seed=7)
    big = assemble(samples)
    # Reference in a child too: this process must not keep a process group around for other tests.
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        reference = pool.apply(_reference, (name, str(tmp_path / "ref.pt")))
    reference = torch.load(reference)
    assert big.num_target_tokens == sum(assemble([s]).num_target_tokens for s in samples)
    for key, value in reference.items():
        torch.testing.assert_close(distributed[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _reference(name: str, out: str) -> str:
    torch.save(_step(name, [collate(train_rows(CFG, seed=7), epoch=0, position=0)], world=1), out)
    return out
