"""Training loop of the FlexVAR transformer on cached latents.

Each optimiser step: draw one schedule (ScheduleSampler) for the step's global batch of
`batch_size` cached full-scale latents (image or its flip); this worker takes its share and runs it
as `accum` micro-batches of `micro_batch` images (global = workers x micro_batch x accum, see
`plan_batches`): quantise them at the schedule's scales into teacher-forcing inputs and targets (no
encoder pass), teacher-forced forward under the configured precision, label-smoothed cross-entropy
averaged over tokens, / accum. Every image of a step has the same token count, so the gradient is the
global batch's mean whatever the split: workers and micro-batch are memory settings, not training
settings. Then clip, AdamW and warmup + cosine learning rate (flexvar.optim, shared with the
tokenizer), and optionally an EMA of the weights that is evaluated and shipped.

Reproducible and resumable: batches are a pure function of (seed, step); schedules come from the
sampler's own generator (the same on every worker); class dropout / drop-path use the global torch
RNG, reseeded per step and rank with several workers (distributed.seed_rank_step). The resume file
holds model, optimiser, LR schedule, EMA, sampler generator and global RNG states plus the step,
written atomically, so a killed run resumes bit-identically on CPU.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from flexvar import distributed
from flexvar.checkpoint import capture_rng, load_checkpoint, restore_rng, save_atomic
from flexvar.config import ScheduleConfig, TrainTransformerConfig
from flexvar.device import autocast_ctx, resolve_precision
from flexvar.data.latent_cache import LatentSplit
from flexvar.data.sampling import batch_indices
from flexvar.tokenizer.quantizer import MultiScaleQuantizer
from flexvar.optim import ema_of, lr_schedule, make_adamw
from flexvar.run_logger import RunLogger
from flexvar.schedules import ScheduleSampler, num_tokens
from flexvar.transformer.train_memory import auto_micro_batch, device_bytes
from flexvar.transformer.teacher_forcing import inputs_targets, resize_bicubic
from flexvar.transformer.fast_paths import smoothed_cross_entropy
from flexvar.transformer.model import FlexVAR

RESUME_FILE = "resume.pt"
RESUME_KIND = "flexvar_train_state"


# --------------------------------------------------------------------------- pieces
def get_batch(data: LatentSplit, items: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (B, C, H, W) and labels (B,) of items i -> (image i // V, view i % V), V cached views per image."""
    V = data.num_views
    z = data.latents_N2CHW[items // V, items % V]
    return z.to(device), data.labels_N[items // V].to(device)


def token_loss(logits_BLV: torch.Tensor, target_BL: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean label-smoothed cross-entropy over all tokens (fp32 whatever the logits' dtype): F.cross_entropy's,
    with its gradient formed in the forward (fast_paths.smoothed_cross_entropy)."""
    return smoothed_cross_entropy(logits_BLV.flatten(0, 1), target_BL.flatten(), label_smoothing)


@lru_cache(maxsize=None)
def compiled_token_loss(backend: str = "inductor"):
    """token_loss through torch.compile with a dynamic token count (one graph for every schedule): the
    V-way softmax, its gradient and the casts fused into two passes over the logits."""
    return torch.compile(token_loss, dynamic=True, backend=backend)


def loss_for(compiled: bool):
    """The loss a training step uses: `token_loss`, or its compiled form under train_transformer.compile."""
    return compiled_token_loss() if compiled else token_loss


def forward_backward(fwd, quantizer: MultiScaleQuantizer, data: LatentSplit, items: torch.Tensor, scales,
                     cfg: TrainTransformerConfig, *, prediction: str, device, accum: int = 1) -> tuple[float, int]:
    """One micro-batch of training: the cached latents of `items` quantised at `scales` into inputs and
    targets, forward in cfg.precision, label-smoothed loss / accum (compiled with
    train_transformer.compile), backward. Returns (that loss, number of images); the optimiser step is
    the caller's."""
    z, labels = get_batch(data, items, device)
    x, tgt = inputs_targets(prediction, quantizer, z, scales)
    with autocast_ctx(device, cfg.precision):
        logits = fwd(labels, x, scales)
    loss = loss_for(cfg.compile)(logits, tgt, cfg.label_smoothing) / accum
    loss.backward()
    return float(loss.detach()), len(labels)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: FlexVAR, quantizer: MultiScaleQuantizer, data: LatentSplit, scales, prediction: str,
             batch_size: int, batches: int, device, precision: str, micro_batch: int | None = None) -> dict[str, float]:
    """Val loss and top-1 token accuracy, overall and per scale, on the first `batches` x `batch_size`
    un-flipped latents in order, run `micro_batch` images at a time (default: batch_size); per-image sums,
    so the result does not depend on the micro-batch."""
    was_training = model.training
    model.eval()
    sizes = [h * w for h, w in scales]
    loss_K, correct_K, count = torch.zeros(len(scales)), torch.zeros(len(scales)), 0
    n, micro = min(batches * batch_size, len(data)), micro_batch or batch_size
    for start in range(0, n, micro):
        sl = slice(start, min(start + micro, n))
        z, labels = latent_at(data.latents_N2CHW[sl, 0].to(device), scales[-1]), data.labels_N[sl].to(device)
        x, tgt = inputs_targets(prediction, quantizer, z, scales)
        with autocast_ctx(device, precision):
            logits = model(labels, x, scales)
        nll_BL = F.cross_entropy(logits.float().transpose(1, 2), tgt, reduction="none").cpu()
        hit_BL = (logits.argmax(-1) == tgt).float().cpu()
        for k, part in enumerate(zip(nll_BL.split(sizes, 1), hit_BL.split(sizes, 1))):
            loss_K[k] += part[0].mean(1).sum()
            correct_K[k] += part[1].mean(1).sum()
        count += len(labels)
    model.train(was_training)
    total = sum(sizes)
    w_K = torch.tensor(sizes, dtype=torch.float32) / total
    out = {"val_loss": float((loss_K / count * w_K).sum()), "val_acc": float((correct_K / count * w_K).sum())}
    for k, (h, w) in enumerate(scales):
        out[f"val_loss_{h}x{w}"] = float(loss_K[k] / count)
        out[f"val_acc_{h}x{w}"] = float(correct_K[k] / count)
    return out


def latent_at(z_BCHW: torch.Tensor, final_hw: tuple[int, int]) -> torch.Tensor:
    """The cached latent as the target of a schedule ending at `final_hw`.

    Beyond the cached size (a larger output or another aspect) no encoder latent exists, so the
    latent is upsampled bicubic along each longer side: a smooth proxy whose coarse scales equal
    the real ones, so val loss there measures how well the model extends a known image.
    """
    H, W = z_BCHW.shape[-2:]
    h, w = final_hw
    if h <= H and w <= W:
        return z_BCHW
    return resize_bicubic(z_BCHW.float(), (max(h, H), max(w, W)))


def evaluate_panel(model: FlexVAR, quantizer: MultiScaleQuantizer, data: LatentSplit,
                   panel: dict[str, list[tuple[int, int]]], prediction: str, batch_size: int, batches: int,
                   device, precision: str, micro_batch: int | None = None) -> dict[str, float]:
    """Val loss / accuracy of each named schedule (`val_loss/<name>`, `val_acc/<name>`) and their
    means (`val_loss_panel`, `val_acc_panel`): how good one model is at every schedule at once."""
    out: dict[str, float] = {}
    for name, scales in panel.items():
        m = evaluate(model, quantizer, data, scales, prediction, batch_size, batches, device, precision, micro_batch)
        out[f"val_loss/{name}"], out[f"val_acc/{name}"] = m["val_loss"], m["val_acc"]
    out["val_loss_panel"] = sum(out[f"val_loss/{n}"] for n in panel) / len(panel)
    out["val_acc_panel"] = sum(out[f"val_acc/{n}"] for n in panel) / len(panel)
    return out


# --------------------------------------------------------------------------- loop
@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def plan_batches(model: FlexVAR, cfg: TrainTransformerConfig, tokens: int, device: torch.device) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) of this run: train_transformer.batch_size (global) =
    workers x micro_batch x accum. micro_batch `auto`: the largest divisor of the worker's share whose
    memory estimate at `tokens` tokens per image fits the device (train_memory.py). ConfigError naming the
    keys when the global batch does not divide."""
    _, world = distributed.rank_world()
    if cfg.micro_batch != "auto":
        return distributed.split_batch(cfg.batch_size, world, cfg.micro_batch, "train_transformer")
    share, _ = distributed.split_batch(cfg.batch_size, world, None, "train_transformer")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))   # workers sharing this machine's RAM (CPU)
    micro = auto_micro_batch(model, tokens, share, resolve_precision(device, cfg.precision),
                             device_bytes(device, local), ema=cfg.ema_decay > 0)
    return distributed.split_batch(cfg.batch_size, world, micro, "train_transformer")


def resume_state(out_dir: Path, fingerprint: dict) -> dict | None:
    """The saved train state when it belongs to this exact run (same fingerprint), else None."""
    path = out_dir / RESUME_FILE
    if not path.exists():
        return None
    state = load_checkpoint(path, kind=RESUME_KIND)
    if state.get("fingerprint") != fingerprint:
        print(f"train_transformer: {path} is from different settings; starting over")
        return None
    return state


def train_transformer(model: FlexVAR, quantizer: MultiScaleQuantizer, train: LatentSplit, val: LatentSplit,
                      cfg: TrainTransformerConfig, schedule: ScheduleConfig, *, prediction: str, seed: int,
                      device: torch.device, out_dir: str | os.PathLike, logger: RunLogger | None = None,
                      val_logger: RunLogger | None = None,
                      fingerprint: dict | None = None, stop_at: int | None = None,
                      on_step: Callable[[int], None] | None = None,
                      val_panel: dict[str, list[tuple[int, int]]] | None = None,
                      parallelism: str = "ddp") -> TrainResult:
    """Train in place for cfg.steps optimiser steps (resuming from out_dir/resume.pt when it matches).

    Logs `loss`, `lr`, `grad_norm`, `tokens_per_s`, `images_per_s` every log_every steps to
    `logger`, and the val metrics (canonical schedule) every eval_every steps and at the end to
    `val_logger` (default: `logger`), with each `val_panel` schedule's too (`evaluate_panel`:
    `val_loss/<name>`, `val_loss_panel`, ...) when one is given. `stop_at` ends the call at that step
    instead (evaluated and saved there, the LR schedule still that of cfg.steps): the Tune sweep trains
    its seeds in lockstep, each to the next report, and a later call resumes from out_dir.

    Multi-worker (an initialised process group): `parallelism` 'ddp' wraps `model` in
    DistributedDataParallel; 'fsdp' shards a copy of it with FSDP2 and loads the consolidated weights
    back into `model` at the end (with train_transformer.ema_decay > 0 the EMA is a plain full copy
    on every worker, fed the gathered weights after each step: one extra all-gather per step).
    Batches: `plan_batches` (global batch = workers x micro_batch x accumulation); gradient accumulation
    communicates on the last micro-step only; evaluation runs in micro-batches on rank 0 (every worker
    under fsdp without EMA). The resume file holds consolidated state (loadable by any number of workers).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = logger or RunLogger()
    val_logger = val_logger or logger
    fingerprint = fingerprint or {}
    model.to(device).train()
    quantizer.to(device)
    # EMA: a plain copy, made before compiling (fsdp: fed the gathered weights)
    ema = ema_of(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    sharded = parallelism == "fsdp" and distributed.active()
    net = copy.deepcopy(model) if sharded else model   # fsdp shards a copy; `model` stays a plain module
    if cfg.compile:
        net.compile_trunk(cfg.compile_bucket)
    train_net = distributed.wrap(net, parallelism, device, shard_units=net.blocks)   # ddp/fsdp: rank 0's weights
    opt = make_adamw(net, cfg)
    lr_sched = lr_schedule(opt, cfg)   # cosine or the official lin0 (train_transformer.lr_schedule)
    latent_hw = train.latent_hw
    sampler = ScheduleSampler(schedule, latent_hw, seed)
    canonical = sampler.to_hw(sampler.cfg.canonical)
    micro_batch, accum = plan_batches(model, cfg, sampler.cfg.max_tokens, device)
    _, world = distributed.rank_world()
    if distributed.is_main():
        print(f"train_transformer: global batch {cfg.batch_size} = {world} worker(s) x micro-batch {micro_batch} "
              f"x {accum} accumulation step(s)", flush=True)
    logger.log_params({"batch.workers": world, "batch.micro_batch": micro_batch, "batch.accumulation_steps": accum,
                       "batch.launcher": distributed.launcher()})
    step, history = 0, []
    state = distributed.from_main(resume_state(out_dir, fingerprint))   # rank 0's resume state on all workers
    if state is not None:
        distributed.load_full_state(train_net, opt, state["model"], state["optimizer"])
        lr_sched.load_state_dict(state["lr_schedule"])
        sampler.load_state_dict(state["sampler"])
        restore_rng(state["rng"])
        step, history = state["step"], list(state.get("history", []))
        if ema is not None:
            ema.load_state_dict(state["ema"])
        print(f"train_transformer: resumed at step {step} from {out_dir / RESUME_FILE}")

    def save_state() -> None:
        model_sd, optim_sd = distributed.full_state(train_net, opt)   # collective under fsdp: every worker
        if not distributed.is_main():   # one writer; every worker holds the same state
            return
        save_atomic({"kind": RESUME_KIND, "fingerprint": fingerprint, "step": step,
                     "model": model_sd, "optimizer": optim_sd, "lr_schedule": lr_sched.state_dict(),
                     "sampler": sampler.state_dict(), "rng": capture_rng(), "history": history,
                     "ema": ema.state_dict() if ema is not None else None},
                    out_dir / RESUME_FILE)

    n_items = train.num_views * len(train)      # every (image, view) once per epoch of the permutation
    t0, toks, imgs, last_metrics = time.perf_counter(), 0, 0, {}
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    while step < end:
        lr = opt.param_groups[0]["lr"]
        loss_sum = 0.0
        scales = sampler.sample()   # one schedule for the whole global batch: the split does not change the step
        mine = distributed.local_part(batch_indices(step, cfg.batch_size, n_items, seed))   # same order on all ranks
        distributed.seed_rank_step(seed, step)   # multi-worker: rank-distinct dropout / drop-path masks
        for micro in range(accum):
            items = mine[micro * micro_batch:(micro + 1) * micro_batch]
            with distributed.grad_sync(train_net, last=micro == accum - 1):   # no_sync until the last
                loss, n_images = forward_backward(train_net, quantizer, train, items, scales, cfg,
                                                  prediction=prediction, device=device, accum=accum)
            loss_sum += loss
            toks += num_tokens(scales) * n_images * world
            imgs += n_images * world
        loss_sum = distributed.mean_across(loss_sum)
        grad_norm = distributed.clipped_step(opt, net.parameters(), cfg.grad_clip)
        opt.zero_grad(set_to_none=True)
        lr_sched.step()
        if ema is not None:
            if sharded:   # the EMA averages full weights: gather the shards into the plain model
                model.load_state_dict(distributed.full_model_state(train_net))
            ema.update_parameters(model)
        step += 1
        if (step % cfg.log_every == 0 or step == end) and distributed.is_main():
            dt = time.perf_counter() - t0
            row = {"loss": loss_sum, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": toks / dt, "images_per_s": imgs / dt}
            logger.log_metrics(row, step)
            history.append({"step": step, "loss": loss_sum})
            t0, toks, imgs = time.perf_counter(), 0, 0
        if (step % cfg.eval_every == 0 or step == end) and (distributed.is_main() or (sharded and ema is None)):
            evaluated = ema.module if ema is not None else net   # fsdp net: every worker takes part
            last_metrics = evaluate(evaluated, quantizer, val, canonical, prediction, cfg.batch_size,
                                    cfg.val_batches, device, cfg.precision, micro_batch)
            if val_panel:
                last_metrics.update(evaluate_panel(evaluated, quantizer, val, val_panel, prediction, cfg.batch_size,
                                                   cfg.val_batches, device, cfg.precision, micro_batch))
            if distributed.is_main():
                val_logger.log_metrics(last_metrics, step)
        if step % cfg.checkpoint_every == 0 or step == end:
            save_state()
        if on_step is not None:
            on_step(step)
    if sharded:
        model.load_state_dict(distributed.full_model_state(train_net))
    if ema is not None and step == cfg.steps:
        model.load_state_dict(ema.module.state_dict())   # the caller saves / samples from the averaged weights
    return TrainResult(step=step, metrics=last_metrics, history=history)


def build_fingerprint(**parts: Any) -> dict:
    """What a resume file must match: the settings and data identity of this run."""
    return {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in parts.items()}
