"""One training-engine interface with two implementations.

- `DeepSpeedEngine`: ZeRO 0/1/2/3, optional CPU offload, bf16 on GPU / fp32 on CPU, clipping, accumulation.
  Used for every real run; also runs on CPU with gloo (tests and the demo).
- `TorchEngine`: a plain torch AdamW loop, single process or DDP; the fast path for unit tests.

The loop (`loop.py`) only talks to this interface. It drives gradient accumulation itself: for every micro-batch
it calls `forward` then `backward(loss, is_boundary)`, and after the boundary micro-batch `step()`. The loss it
passes in is already normalised (`loss_sum * world_size / step_target_tokens`, see docs/internals.md), so both
engines must apply no further scaling by the accumulation count; the data-parallel gradient mean supplies the
`1 / world_size`.

The model must expose `loss(batch: PackedBatch) -> (loss_sum, num_target_tokens)` (docs/internals.md). DeepSpeed
only sees a `LossModule` wrapper whose `forward(batch)` calls it, so ZeRO-3's parameter-gathering hooks run
(they live on module calls, not on arbitrary methods).
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from otterhd_ray.config import FinetuneConfig
from otterhd_ray.train.deepspeed import build_deepspeed_config, resolve_precision
from otterhd_ray.train.schedule import build_optimizer, build_scheduler, param_groups

if TYPE_CHECKING:
    from otterhd_ray.models.fuyu.inputs import PackedBatch

# Files a checkpoint directory holds per engine (checkpoint.py checks them before trusting a checkpoint).
TORCH_MODEL_FILE = "model.pt"
TORCH_OPTIM_FILE = "optimizer.pt"
DS_TAG = "deepspeed"


class LossModule(nn.Module):
    """`forward(batch) -> (loss_sum, num_target_tokens)`: lets DeepSpeed/DDP call `model.loss` as a forward.

    DDP's input move and ZeRO-3's backward hooks look into tuples, lists and dicts only, so they leave a
    `PackedBatch` as it is: the loop has already moved it, and none of its tensors requires grad."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, int]:
        return self.model.loss(batch)


class Engine(ABC):
    """forward / backward / step / zero_grad / save / load / lr — the loop's whole view of training."""

    device: torch.device
    model: nn.Module  # the bare model (for export and evaluation), never the wrapper

    @abstractmethod
    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, int]:
        """`(loss_sum, num_target_tokens)` of one packed micro-batch already on `self.device`."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, is_boundary: bool) -> None:
        """Accumulate gradients; `is_boundary` marks the last micro-batch of an optimizer step."""

    @abstractmethod
    def step(self) -> torch.Tensor:
        """Clip, update, advance the LR schedule, clear grads; returns the pre-clip grad norm (on device)."""

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Every rank calls this (ZeRO shards are per rank); it returns once this rank's files are written."""

    @abstractmethod
    def load(self, directory: str | Path) -> None: ...

    @property
    @abstractmethod
    def lr(self) -> float: ...


# ------------------------------------------------------------------------------------------------ torch
class TorchEngine(Engine):
    """Plain torch: AdamW + LambdaLR, optional DDP (`no_sync` on non-boundary micro-batches)."""

    def __init__(
        self, model: nn.Module, cfg: FinetuneConfig, total_steps: int, device: torch.device, ddp: bool
    ) -> None:
        self.device = device
        self.model = model.to(device)
        self._cfg = cfg
        wrapper = LossModule(self.model)
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            wrapper = DistributedDataParallel(wrapper, device_ids=[device.index] if device.type == "cuda" else None)
        self._module = wrapper
        self._ddp = ddp
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim.scheduler, total_steps, cfg.optim.warmup_ratio)
        precision = resolve_precision(cfg.train.precision, device.type == "cuda")
        self._autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, int]:
        if self._autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self._autocast_dtype):
                return self._module(batch)
        return self._module(batch)

    def backward(self, loss: torch.Tensor, is_boundary: bool) -> None:
        if self._ddp and not is_boundary:
            # DDP all-reduces inside backward; skip it for all but the step's last micro-batch.
            with self._module.no_sync():
                loss.backward()
        else:
            loss.backward()

    def step(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self._cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.zero_grad()
        return norm.detach()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank == 0:  # replicas are identical under DDP
            torch.save(_trainable_state(self.model), directory / TORCH_MODEL_FILE)
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                directory / TORCH_OPTIM_FILE,
            )

    def load(self, directory: str | Path) -> None:
        directory = Path(directory)
        _load_trainable(self.model, torch.load(directory / TORCH_MODEL_FILE, map_location=self.device))
        state = torch.load(directory / TORCH_OPTIM_FILE, map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


# -------------------------------------------------------------------------------------------- deepspeed
class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO engine; `deepspeed` is imported here, inside the worker, as Ray Train requires."""

    def __init__(
        self, model: nn.Module, cfg: FinetuneConfig, total_steps: int, device: torch.device, world_size: int
    ) -> None:
        import deepspeed

        use_gpu = device.type == "cuda"
        self.device = device
        self.model = model
        self.ds_config = build_deepspeed_config(cfg, world_size, use_gpu)
        precision = resolve_precision(cfg.train.precision, use_gpu)
        if precision == "bf16":
            # DeepSpeed's bf16 mode expects the module already in bf16; fp32 masters live in the optimizer.
            model.to(torch.bfloat16)
        groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, cfg.optim.weight_decay)]
        optim = cfg.optim

        def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return build_scheduler(optimizer, optim.scheduler, total_steps, optim.warmup_ratio)

        ds = cfg.deepspeed
        fused = ds.fused_torch_adam if ds.fused_torch_adam is not None else use_gpu and not ds.offload_optimizer
        client_optimizer = None
        if ds.torch_adam and fused:
            # DeepSpeed's `torch_adam` builds torch AdamW with `foreach` only; the fused kernel runs the whole
            # update in one launch (measured on an H100 in docs/benchmarks.md). ZeRO wraps it as usual.
            client_optimizer = torch.optim.AdamW(
                groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=True
            )
            self.ds_config = {k: v for k, v in self.ds_config.items() if k != "optimizer"}
        wrapper = LossModule(model)
        self._engine, _, _, _ = deepspeed.initialize(
            model=wrapper,
            optimizer=client_optimizer,
            model_parameters=None if client_optimizer is not None else groups,
            lr_scheduler=make_scheduler,
            config=self.ds_config,
            dist_init_required=not torch.distributed.is_initialized(),
        )
        if cfg.deepspeed.stage == 3 and isinstance(getattr(model, "lm_head", None), nn.Linear):
            # The chunked loss multiplies by lm_head.weight outside lm_head's own forward, where ZeRO-3 would
            # see only this rank's empty partition: make the wrapper's forward gather it.
            deepspeed.zero.register_external_parameter(self._engine.module, model.lm_head.weight)

    @property
    def ds_engine(self) -> Any:
        return self._engine

    def forward(self, batch: PackedBatch) -> tuple[torch.Tensor, int]:
        return self._engine(batch)

    def backward(self, loss: torch.Tensor, is_boundary: bool) -> None:
        # We own the boundaries (a short last step per epoch is allowed); DeepSpeed reduces and steps on them.
        self._engine.set_gradient_accumulation_boundary(is_boundary)
        self._engine.backward(loss, scale_wrt_gas=False)
        if not is_boundary:
            # DeepSpeed's step() on a non-boundary micro-step only advances its micro-step counter.
            self._engine.step()

    def step(self) -> torch.Tensor:
        self._engine.step()
        norm = self._engine.get_global_grad_norm()
        if norm is None:
            return torch.full((), float("nan"), device=self.device)
        return norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm), device=self.device)

    def zero_grad(self) -> None:
        self._engine.zero_grad()

    def save(self, directory: str | Path) -> None:
        # save_latest=False: the Ray checkpoint directory is the unit of "latest", not DeepSpeed's tag file.
        # With LoRA the frozen base is left out: a checkpoint holds the adapters and their optimizer state only.
        self._engine.save_checkpoint(
            str(directory), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=_has_lora(self.model)
        )

    def load(self, directory: str | Path) -> None:
        path, _ = self._engine.load_checkpoint(
            str(directory), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
            load_module_strict=not _has_lora(self.model),
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")

    @property
    def lr(self) -> float:
        return float(self._engine.get_lr()[0])


def _has_lora(model: nn.Module) -> bool:
    return getattr(model, "lora_spec", None) is not None


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict, or with LoRA only the adapters (the base is frozen and comes from model.path)."""
    state = model.state_dict()
    if not _has_lora(model):
        return state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trainable}


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not _has_lora(model):
        model.load_state_dict(state)
        return
    expected = set(_trainable_state(model))
    if set(state) != expected:
        raise ValueError(f"checkpoint adapters do not match the model's: {sorted(set(state) ^ expected)[:4]}")
    model.load_state_dict(state, strict=False)


def _single_process_env() -> None:
    """Launcher variables for a one-rank in-process DeepSpeed run (tests, `ray.num_workers: 0`).

    Without them DeepSpeed goes looking for mpi4py, and it reads LOCAL_RANK again later, so they stay set.
    A fresh free port every time: a MASTER_PORT inherited from an earlier run in this process (or its parent)
    may still be bound. Under Ray Train the worker group has set up torch.distributed and this is not used.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


def build_engine(
    model: nn.Module, cfg: FinetuneConfig, total_steps: int, device: torch.device, world_size: int
) -> Engine:
    """DeepSpeed when `deepspeed.enabled`, else plain torch (DDP when `world_size > 1`)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if cfg.deepspeed.enabled:
        if torch.distributed.is_initialized():
            return DeepSpeedEngine(model, cfg, total_steps, device, world_size)
        if world_size != 1:
            raise ValueError(f"world_size {world_size} without an initialised torch.distributed group")
        _single_process_env()
        return DeepSpeedEngine(model, cfg, total_steps, device, world_size)
    return TorchEngine(model, cfg, total_steps, device, ddp=world_size > 1)
