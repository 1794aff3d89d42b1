"""Which items each training step reads: seeded, sharded by rank, resumable at the exact step.

The batch of global step `s` is a pure function of (seed, s, dataset size): a fresh seeded
permutation per epoch cut into full global batches. So a killed run resumes by starting the
sampler at its saved step (nothing else to store), a DataLoader may prefetch ahead freely, and
data-parallel workers split each global batch by rank (rank r takes items r, r+W, ...): within an
epoch the W workers read disjoint items, and together exactly the single-process batch.
"""
from __future__ import annotations

import functools
from typing import Iterator

import torch
from torch.utils.data import Sampler

from flexvar.distributed import rank_part


@functools.lru_cache(maxsize=2)   # this epoch's and (across an epoch boundary) the previous one's
def epoch_permutation(n_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded order of the n items in `epoch`, computed once per epoch rather than once per step:
    one randperm of ImageNet's 2.56 M (image, flip) keys costs ~0.2-0.3 s of CPU, more than a d16
    GPU step. Held as int32 (4 bytes per item: 10 MB for 2.56 M keys); the values are randperm's."""
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm.to(torch.int32) if n_items < 2 ** 31 else perm


def batch_indices(micro_step: int, batch_size: int, n_items: int, seed: int) -> torch.Tensor:
    """Items (int64) of global batch `micro_step`: a fresh seeded permutation of the n items per epoch,
    cut into full batches (fewer items than one batch: wraps around)."""
    per_epoch = max(1, n_items // batch_size)
    epoch, pos = divmod(micro_step, per_epoch)
    perm = epoch_permutation(n_items, seed, epoch)
    take = perm[pos * batch_size:(pos + 1) * batch_size]
    if len(take) < batch_size:   # fewer items than one batch: wrap around
        take = perm[torch.arange(pos * batch_size, (pos + 1) * batch_size) % n_items]
    return take.to(torch.int64, copy=True)   # callers never see (or change) the cached permutation


class StepBatchSampler(Sampler[list[int]]):
    """Batch sampler for a DataLoader: this rank's part of global batches start_step, start_step+1, ...

    `steps` None: endless (the training loop decides when to stop)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, start_step: int = 0, steps: int | None = None,
                 rank: int = 0, world: int = 1):
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.start_step, self.steps, self.rank, self.world = start_step, steps, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.steps is None or step < self.start_step + self.steps:
            global_B = batch_indices(step, self.batch_size, self.n_items, self.seed)
            yield rank_part(global_B, self.rank, self.world).tolist()
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless StepBatchSampler has no length")
        return self.steps


class RangeBatchSampler(Sampler[list[int]]):
    """Items start..stop in order, in batches (evaluation, latent extraction, reference statistics)."""

    def __init__(self, n_items: int, batch_size: int, start: int = 0):
        self.n_items, self.batch_size, self.start = n_items, batch_size, start

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start, self.n_items, self.batch_size):
            yield list(range(s, min(s + self.batch_size, self.n_items)))

    def __len__(self) -> int:
        return max(0, -(-(self.n_items - self.start) // self.batch_size))
