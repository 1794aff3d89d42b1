"""Data-parallel training hooks: no-ops unless torch.distributed is initialised.

The training loops call these so the same loop runs on one process or on N workers (Ray Train's
TorchTrainer sets up the process group: gloo on CPU, NCCL on GPU). With N workers each one takes
a 1/N slice of the global batch, gradients are averaged across workers before clipping (what DDP
does), so N workers follow the single-process trajectory with the same global batch up to float
summation order and per-sample randomness (class dropout, drop-path draw from each worker's RNG).

Nothing here knows about Ray: any launcher that initialises torch.distributed works (torchrun too).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    return rank_world()[0] == 0


def local_part(items: torch.Tensor) -> torch.Tensor:
    """This worker's share of a global batch (rank r takes items r, r+N, ...); the global batch must divide."""
    rank, world = rank_world()
    if len(items) % world:
        raise ValueError(f"global batch of {len(items)} does not split over {world} workers")
    return items[rank::world]


def broadcast_params(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every worker (identical start, whatever each worker's RNG did)."""
    if active():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Mean of each gradient across workers, in place (one flat all-reduce per call)."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


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
