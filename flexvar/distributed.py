"""Data-parallel training through PyTorch's own DDP and FSDP2: no-ops unless torch.distributed is initialised.

The training loops call these so the same loop runs on one process or on N workers (Ray Train's
TorchTrainer sets up the process group: gloo on CPU, NCCL on GPU). With N workers each one takes
a 1/N slice of the global batch and `wrap` hands the model to
  * `ddp`: `DistributedDataParallel` - gradient buckets are all-reduced (averaged) while backward
    still runs, so communication overlaps computation;
  * `fsdp`: FSDP2 `fully_shard` per transformer block and at the root - parameters, gradients and
    optimiser state are sharded over the workers (each holds 1/N), gathered block by block.
Either way N workers follow the single-process trajectory with the same global batch up to float
summation order and per-sample randomness (class dropout, drop-path draw from each worker's RNG).
`grad_sync(model, last)` skips the gradient communication on all but the last micro-step of
gradient accumulation. Checkpoints go through torch.distributed.checkpoint's state-dict API with
full (consolidated) state dicts, keyed by parameter names, so a checkpoint written by N workers loads
in one process and vice versa.

Nothing here knows about Ray: any launcher that initialises torch.distributed works (torchrun too:
`init_from_env` joins the group torchrun's environment describes).

Batches: `train_*.batch_size` is the global batch of one optimiser step. `split_batch` cuts it into
workers x micro-batch x accumulation steps (the per-device micro-batch is a memory setting, the
accumulation is derived) and refuses a global batch that does not divide. Every worker reads the
same global data order and takes its share (`local_part`); per-sample randomness (class dropout,
drop-path) is drawn from a per-rank, per-step seed (`seed_rank_step`) so workers do not repeat each
other's masks.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from typing import Any, Iterable, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor

from flexvar.config import ConfigError

Parallelism = Literal["ddp", "fsdp"]
PARALLELISMS = ("ddp", "fsdp")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    return rank_world()[0] == 0


def resolve_workers(setting: int | str) -> int:
    """`resources.train_workers`: a number as given; `auto` = the GPUs visible (1 without a GPU)."""
    if setting != "auto":
        return int(setting)
    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1


def launched_by_torchrun() -> bool:
    """True in a process torchrun (torch.distributed.run) started: its rendezvous environment is set."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def launcher() -> str:
    """Who started this data-parallel group: torchrun (`dvc repro`'s stages), the caller (a group set up
    before the stage ran, e.g. the flow's Ray Train workers), or none (a single process)."""
    if not active():
        return "none"
    return "torchrun" if launched_by_torchrun() else "caller"


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (nccl on CUDA, one GPU per local rank; gloo on CPU) and
    return this worker's device; outside torchrun, or in a group already set up (Ray Train), `device`."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    return device


def split_batch(global_batch: int, workers: int, micro_batch: int | None, section: str) -> tuple[int, int]:
    """(micro-batch per device, accumulation steps) with global = workers x micro x accum.

    `micro_batch` None = the whole per-worker share in one pass. Raises ConfigError naming
    `<section>.batch_size`, `resources.train_workers` and `<section>.micro_batch` when it does not divide."""
    keys = f"{section}.batch_size = {global_batch}, resources.train_workers = {workers}"
    if global_batch % workers:
        raise ConfigError(f"{keys}: the global batch must be divisible by the workers; change either")
    share = global_batch // workers
    micro = share if micro_batch is None else micro_batch
    if micro > share or share % micro:
        raise ConfigError(f"{keys}, {section}.micro_batch = {micro}: the global batch must be workers x "
                          f"micro_batch x accumulation steps; use a micro_batch dividing {share} (or auto)")
    return micro, share // micro


def seed_rank_step(seed: int, step: int) -> None:
    """Multi-worker: reseed the global RNGs from (seed, step, rank), so each worker draws its own dropout /
    drop-path masks, reproducibly and resumably at any step. A no-op in one process (its RNG stream runs on)."""
    if active():
        torch.manual_seed(hash((seed, step, dist.get_rank())) & 0x7FFF_FFFF_FFFF_FFFF)


def rank_part(items: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s share of a global batch (items rank, rank+world, ...); the batch must divide."""
    if len(items) % world:
        raise ValueError(f"global batch of {len(items)} does not split over {world} workers")
    return items[rank::world]


def local_part(items: torch.Tensor) -> torch.Tensor:
    """This worker's share of a global batch (`rank_part` for this process's rank)."""
    return rank_part(items, *rank_world())


def broadcast_params(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every worker (identical start, whatever each worker's RNG did)."""
    if active():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def mean_across(value: float) -> float:
    """Mean of a scalar over workers (for logging the global loss)."""
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every worker (e.g. the resume state rank 0 read from disk)."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- model wrapping
def wrap(model: nn.Module, parallelism: Parallelism, device: torch.device,
         shard_units: Iterable[nn.Module] = ()) -> nn.Module:
    """`model` ready for data-parallel training; `model` itself in a single process.

    ddp: a DistributedDataParallel around `model` (broadcasts rank 0's weights at construction;
    `model` stays a plain module the caller can save). fsdp: `model` sharded in place with
    `fully_shard`, each of `shard_units` (the transformer blocks) as its own unit so only one block is
    gathered at a time; rank 0's weights are broadcast first. The caller keeps a plain copy if it needs one.
    """
    if parallelism not in PARALLELISMS:
        raise ValueError(f"resources.parallelism must be one of {', '.join(PARALLELISMS)}, got {parallelism!r}")
    if not active():
        return model
    if parallelism == "ddp":
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    broadcast_params(model)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in shard_units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def grad_sync(model: nn.Module, last: bool):
    """Context for one micro-step's backward: gradients are communicated only when `last` (no_sync otherwise)."""
    if last:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):   # FSDP2 module: reduce-scatter only on the last micro-step
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: nn.Module):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (an FSDP2 module is its own module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def any_sharded(params: Iterable[torch.Tensor]) -> bool:
    """True when any of `params` is an FSDP2 shard (a DTensor)."""
    return any(isinstance(p, DTensor) for p in params)


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2 module: every worker must take part in its forward passes (evaluation too)."""
    return any_sharded(model.parameters())


def clipped_step(opt: torch.optim.Optimizer, params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """opt.step() on the gradients clipped to total norm `max_norm` (no clipping when it is <= 0).
    Returns the total norm before clipping (a plain tensor, also over sharded gradients; 0 unclipped).

    A fused optimiser (`optim.make_adamw`'s) on plain tensors gets the clip as the `grad_scale` its
    kernel divides every gradient by (the attribute torch.amp.GradScaler hands it), so the gradients
    are read once less: over the 18M fp32 gradients of a d6 model that pass is ~1% of a CPU step.
    Values: g / (1 / c) instead of g * c, fp32 rounding when clipping, identical otherwise."""
    params = [p for p in params if p.grad is not None]
    if max_norm <= 0:
        opt.step()
        return torch.zeros(())
    if all(g.get("fused") for g in opt.param_groups) and not any_sharded(params):
        norm = nn.utils.get_total_norm([p.grad for p in params])
        opt.grad_scale = (norm + 1e-6).div(max_norm).clamp(min=1.0)   # 1 / clip_grad_norm_'s clamped factor
        try:
            opt.step()
        finally:
            del opt.grad_scale
        return norm
    norm = nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# --------------------------------------------------------------------------- checkpoints
FULL = StateDictOptions(full_state_dict=True)


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Consolidated (model, optimiser) state dicts keyed by parameter names, the same on every worker and
    in one process (collective under fsdp: call it on every worker)."""
    return get_state_dict(unwrap(model), opt, options=FULL)


def full_model_state(model: nn.Module) -> dict:
    """Consolidated model state dict (collective under fsdp)."""
    return get_model_state_dict(unwrap(model), options=FULL)


def load_full_state(model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load what `full_state` returned (from any number of workers) into a plain, DDP or FSDP model."""
    set_state_dict(unwrap(model), opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=FULL)
