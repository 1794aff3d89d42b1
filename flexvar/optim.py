"""Optimisation utilities shared by the tokenizer and transformer trainers: one of each.

- `make_adamw`: AdamW with the official VAR weight-decay rule (see `decay_groups`).
- `warmup_cosine`: linear warmup then cosine decay, as a `torch.optim.lr_scheduler.LambdaLR`
  (so its position is saved and restored with `state_dict()` on resume); `lr_schedule` picks it or
  the official FlexVAR/VAR `lin0` (`lin0_factor`) by `cfg.lr_schedule`.
- `ema_of`: an exponential moving average of a model's weights, PyTorch's own
  `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# Name parts of parameters that never get weight decay: position maps / start vector of the
# transformer, its per-head attention temperature, and the tokenizer's codebook.
NO_DECAY_KEYS = ("pos_", "log_scale", "embedding")


def decay_groups(module: nn.Module, weight_decay: float,
                 no_decay_keys: Sequence[str] = NO_DECAY_KEYS) -> list[dict]:
    """Two AdamW parameter groups, [decayed, not decayed], in `named_parameters()` order.

    The rule is the official VAR one (`filter_params` in VAR's utils/lr_control.py): a trainable
    parameter gets no weight decay when it is a vector or scalar (norm gains, biases), when its name
    ends with "bias", or when its name contains one of `no_decay_keys` (the model's learned position
    maps, start token, attention-scale and codebook entries); every other trainable parameter, i.e.
    the conv / linear / embedding matrices, is decayed. Frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith("bias") or any(k in name for k in no_decay_keys)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(module: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over `decay_groups(module)` with cfg.lr, cfg.betas, cfg.weight_decay (either trainer's config)."""
    groups = decay_groups(module, cfg.weight_decay)
    # fused: one kernel per step for all parameters (CPU and CUDA) instead of foreach's several passes
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at `step`: linear warmup (step+1)/warmup_steps, then cosine from 1 down to
    `min_lr_ratio` at `total_steps` (held there after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(opt: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of either trainer: `warmup_cosine_factor` with cfg.warmup_steps, cfg.steps and
    cfg.min_lr_ratio, times each group's initial lr. Call `.step()` after each optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))


LIN0_WARMUP_START, LIN0_HOLD = 0.005, 0.05   # official utils/arg_util.py wp0; utils/lr_control.py 'lin0' T


def lin0_factor(step: int, total_steps: int, warmup_steps: int, end_ratio: float) -> float:
    """LR multiplier of the official 'lin0' schedule (FlexVAR/VAR utils/lr_control.py): linear warmup
    from 0.005, then 1 for the first 5% of the remaining steps, then linear down to `end_ratio` (the
    official `wpe`) at the last step, `total_steps - 1`."""
    if step < warmup_steps:
        return LIN0_WARMUP_START + (1 - LIN0_WARMUP_START) * step / warmup_steps
    done = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    if done < LIN0_HOLD:
        return 1.0
    return end_ratio + (1 - end_ratio) * (1 - done) / (1 - LIN0_HOLD)


def lr_schedule(opt: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_cosine`, or the official `lin0` when cfg.lr_schedule says so (cfg.min_lr_ratio is its wpe)."""
    if getattr(cfg, "lr_schedule", "cosine") != "lin0":
        return warmup_cosine(opt, cfg)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lin0_factor(s, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))


def ema_of(model: nn.Module, decay: float) -> AveragedModel:
    """EMA of `model`'s parameters and buffers: after each `update_parameters(model)`,
    avg = decay * avg + (1 - decay) * weights. Seeded with the current weights, so the first update
    already blends (the average starts at the initial weights, not at the first trained ones)."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.update_parameters(model)   # n_averaged 0 -> 1: copies the current weights
    return ema
