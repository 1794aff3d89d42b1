"""How much device memory one transformer training micro-batch needs, and the micro-batch that fits.

`train_transformer.micro_batch: auto` asks for the largest per-device micro-batch that divides the
worker's share of the global batch and whose estimate fits the device. The estimate is linear in the
micro-batch, fitted to the measured d16 train step on an H200 (docs/benchmarks.md: 256 px, 680
tokens, bf16 autocast, eager SDPA; peak 24.3 / 44.4 / 84.5 GiB at 32 / 64 / 128 images):

  * fixed: fp32 weights, gradients and AdamW's two moments, 16 bytes per parameter (+4 with EMA);
  * per image: L tokens x (depth x ACT_BYTES_PER_CHANNEL x width  +  LOGIT_BYTES x vocab), the
    activations autograd keeps per block and the logits with their fp32 copy and gradient.

With ACT_BYTES_PER_CHANNEL = 56 and LOGIT_BYTES = 10 that gives d16 25.0 / 45.4 / 86.2 GiB at
32 / 64 / 128: 1-3% above the measured peaks, as an estimate that refuses nothing that fits should be.
fp32 training (no autocast) keeps activations at twice the size: ACT x 2.
"""
from __future__ import annotations

import os

import torch

GIB = 1024 ** 3
ACT_BYTES_PER_CHANNEL = 56   # per token, per block, per channel of width (bf16 autocast)
LOGIT_BYTES = 10             # per token, per vocabulary entry: bf16 logits, fp32 copy, gradient
PARAM_BYTES = 16             # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
USABLE = 0.9                 # of the device's memory: allocator fragmentation, CUDA context


def train_bytes(model, tokens: int, micro_batch: int, precision: str, ema: bool = False) -> int:
    """Estimated peak bytes of one training micro-batch of `micro_batch` images of `tokens` tokens each."""
    act = ACT_BYTES_PER_CHANNEL * (1 if precision == "bf16" else 2)
    per_image = tokens * (model.depth * act * model.width + LOGIT_BYTES * model.vocab_size)
    fixed = model.num_params() * (PARAM_BYTES + (4 if ema else 0))
    return int(fixed + micro_batch * per_image)


def device_bytes(device: torch.device, local_workers: int = 1) -> int:
    """Memory one worker may use: the GPU's total, or this machine's RAM shared by its `local_workers`."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_workers, 1)


def auto_micro_batch(model, tokens: int, per_worker: int, precision: str, budget_bytes: int,
                     ema: bool = False) -> int:
    """The largest divisor of `per_worker` (images per worker per step) whose estimate fits USABLE x budget
    (1 when even one image does not: the run then fails like any out-of-memory run)."""
    for micro in sorted((d for d in range(1, per_worker + 1) if per_worker % d == 0), reverse=True):
        if train_bytes(model, tokens, micro, precision, ema) <= USABLE * budget_bytes:
            return micro
    return 1
