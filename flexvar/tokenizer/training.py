"""Multi-scale VQVAE training loop (paper §3.3): one latent, K scales per batch, one codebook.

Each step encodes the batch once, draws K scales between 1 and the full latent size (always
including the full size), and at each scale area-downsamples the latent, quantises it
(straight-through), decodes it and compares the result with the input resized to that scale's
resolution. The loss is the mean over scales of: L1/L2 reconstruction, codebook + commitment
(+ entropy) terms, and optionally an LPIPS-style perceptual term and a hinge PatchGAN term
(from `gan_start_step`).

Multi-worker (an initialised process group): each worker takes 1/N of the batch; the VQVAE's whole step
forward (`ScalesForward`: encode once, quantise and decode at every scale) and the discriminator's loss
(`DiscriminatorLoss`) run as single DistributedDataParallel forwards, so their gradient buckets are
averaged across workers while backward runs. The discriminator's BatchNorm becomes SyncBatchNorm on
CUDA (global-batch statistics, as in one process); on CPU (gloo; SyncBatchNorm is GPU-only) each worker
normalises with its own half-batch statistics, the one difference from the 1-worker run. Every worker
draws the same scales (the trainer's generator) over one global data order, and its own dropout masks
(global RNG reseeded per step and rank: distributed.seed_rank_step); rank 0 alone evaluates, logs and
writes the checkpoint.

Resume without loss: `TokenizerTrainer.save(path)` captures model, optimiser, LR schedule,
EMA, discriminator, every RNG (global ones and the explicit generator that draws the scales) and
the step; `resume(path)` restores them, so a killed run that is restarted ends with bit-identical
weights on CPU. The data order needs no state: batch s is a pure function of (seed, s)
(flexvar/data/sampling.py), read through a DataLoader that restarts at the resumed step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flexvar import distributed
from flexvar.checkpoint import capture_rng, load_checkpoint, restore_rng, save_atomic
from flexvar.config import TokenizerConfig, TrainTokenizerConfig
from flexvar.data.sampling import StepBatchSampler
from flexvar.data.splits import ImageSplit, to_unit_range
from flexvar.device import autocast_ctx, resolve_precision
from flexvar.tokenizer.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from flexvar.tokenizer.quantizer import downsample
from flexvar.optim import ema_of, make_adamw, warmup_cosine
from flexvar.run_logger import RunLogger
from flexvar.tokenizer.bf16_copy import decode_latents, encode_images
from flexvar.tokenizer.vqvae import VQVAE

TRAIN_CKPT_KIND = "tokenizer_train_state"


# --------------------------------------------------------------------------- small pieces
def sample_scales(full: int, k: int, gen: torch.Generator) -> list[int]:
    """K distinct scales in [1, full], increasing, always ending with `full` (fewer if full < K)."""
    others = torch.randperm(full - 1, generator=gen)[: max(k - 1, 0)] + 1 if full > 1 else torch.zeros(0, dtype=torch.long)
    return sorted(int(s) for s in others) + [full]


def scale_hw(scale: int, full_hw: tuple[int, int]) -> tuple[int, int]:
    """Latent (h, w) of `scale` along the longer side, keeping the full latent's aspect ratio."""
    H, W = full_hw
    longer = max(H, W)
    return max(1, round(scale * H / longer)), max(1, round(scale * W / longer))


def resize_images(x_BCHW: torch.Tensor, hw_px: tuple[int, int]) -> torch.Tensor:
    """The input as seen at a coarser scale: area (box-filter) resize to (H, W) pixels."""
    return downsample(x_BCHW, hw_px)


def recon_loss(rec_BCHW: torch.Tensor, target_BCHW: torch.Tensor, kind: str) -> torch.Tensor:
    """'l1', 'l2' or 'l1+l2' between a decoded image and its target."""
    loss = rec_BCHW.new_zeros(())
    if "l1" in kind:
        loss = loss + F.l1_loss(rec_BCHW, target_BCHW)
    if "l2" in kind:
        loss = loss + F.mse_loss(rec_BCHW, target_BCHW)
    return loss


def psnr(rec_BCHW: torch.Tensor, target_BCHW: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] (peak-to-peak 2), after clamping the reconstruction."""
    mse_B = (rec_BCHW.clamp(-1, 1) - target_BCHW).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse_B.clamp_min(1e-10))


# --------------------------------------------------------------------------- evaluation
@dataclass
class ScaleEval:
    psnr: float
    l1: float


@torch.no_grad()
def evaluate_scales(model: VQVAE, images_NCHW: torch.Tensor, scales: list[int], device: torch.device,
                    precision: str = "fp32", batch_size: int = 64) -> dict:
    """Val reconstruction quality at each scale and codebook statistics.

    Returns {"per_scale": {s: ScaleEval}, "usage": fraction of codes used over all scales,
    "perplexity": exp entropy of that code histogram, "usage_full"/"perplexity_full" at the full scale}.
    """
    was_training = model.training
    model.eval()
    f = model.downsample
    sums = {s: [0.0, 0.0] for s in scales}
    counts_all = torch.zeros(model.cfg.codebook_size, dtype=torch.long)
    counts_full = torch.zeros_like(counts_all)
    for i in range(0, len(images_NCHW), batch_size):
        x = to_unit_range(images_NCHW[i:i + batch_size]).to(device)
        z = encode_images(model, x, precision)          # bf16: the cached bf16 encoder / decoder
        full_hw = tuple(z.shape[-2:])
        for s in scales:
            hw = scale_hw(s, full_hw)
            idx, zq = model.quantize_at(z.float(), hw)
            rec = decode_latents(model, zq, precision)
            target = resize_images(x, (hw[0] * f, hw[1] * f))
            sums[s][0] += psnr(rec, target).sum().item()
            sums[s][1] += (rec.clamp(-1, 1) - target).abs().flatten(1).mean(1).sum().item()
            binc = torch.bincount(idx.flatten().cpu(), minlength=model.cfg.codebook_size)
            counts_all += binc
            if s == max(scales):
                counts_full += binc
    model.train(was_training)
    n = len(images_NCHW)
    return {"per_scale": {s: ScaleEval(psnr=v[0] / n, l1=v[1] / n) for s, v in sums.items()},
            **codebook_stats(counts_all, ""), **codebook_stats(counts_full, "_full")}


def codebook_stats(counts_V: torch.Tensor, suffix: str) -> dict[str, float]:
    probs_V = counts_V.double() / counts_V.sum().clamp_min(1)
    entropy = -(probs_V[probs_V > 0] * probs_V[probs_V > 0].log()).sum()
    return {f"usage{suffix}": (counts_V > 0).double().mean().item(), f"perplexity{suffix}": entropy.exp().item()}


# --------------------------------------------------------------------------- DDP units
class ScalesForward(nn.Module):
    """One training step's generator forward as a single module call (what DDP wraps): encode the batch
    once, then straight-through quantise and decode the latent at each of `hws`."""

    def __init__(self, model: VQVAE, precision: str):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, x_BCHW: torch.Tensor, hws: list[tuple[int, int]]) -> list[tuple[torch.Tensor, dict]]:
        with autocast_ctx(x_BCHW.device, self.precision):
            z = self.model.encode(x_BCHW)
        outs = []
        for hw in hws:
            with autocast_ctx(x_BCHW.device, self.precision):
                rec, _, q = self.model.forward_scale(z, hw)
            outs.append((rec.float(), q))
        return outs


class DiscriminatorLoss(nn.Module):
    """The discriminator's hinge loss over (real, reconstructed) pairs of every scale, as one module call."""

    def __init__(self, disc: PatchDiscriminator, precision: str):
        super().__init__()
        self.disc, self.precision = disc, precision

    def forward(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        loss = 0.0
        for real, fake in pairs:
            with autocast_ctx(real.device, self.precision):
                loss = loss + hinge_d_loss(self.disc(real).float(), self.disc(fake).float()) / len(pairs)
        return loss


# --------------------------------------------------------------------------- the trainer
class TokenizerTrainer:
    """Owns everything a tokenizer training run mutates, so it can be saved and resumed exactly."""

    def __init__(self, model_cfg: TokenizerConfig, cfg: TrainTokenizerConfig, seed: int,
                 train_images_NCHW: torch.Tensor | ImageSplit, device: torch.device, num_workers: int = 0):
        self.model_cfg, self.cfg, self.seed, self.device = model_cfg, cfg, seed, device
        self.data = (train_images_NCHW if isinstance(train_images_NCHW, ImageSplit) else   # uint8 images, CPU
                     ImageSplit(train_images_NCHW, torch.zeros(len(train_images_NCHW), dtype=torch.long), []))
        self.num_workers, self._batches = num_workers, None
        # the global batch = workers x micro_batch x accum (auto: the whole share of each worker, no accumulation)
        micro = None if cfg.micro_batch == "auto" else cfg.micro_batch
        self.micro_batch, self.accum = distributed.split_batch(cfg.batch_size, distributed.rank_world()[1], micro,
                                                               "train_tokenizer")
        if len(self.data) < cfg.batch_size:
            raise ValueError(f"train_tokenizer.batch_size = {cfg.batch_size} exceeds the {len(self.data)} "
                             f"training images")
        self.precision = resolve_precision(device, cfg.precision)
        torch.manual_seed(seed)
        self.model = VQVAE(model_cfg).to(device).train()
        self.opt = make_adamw(self.model, cfg)
        self.sched = warmup_cosine(self.opt, cfg)
        self.ema = ema_of(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.perceptual = None
        if cfg.perceptual_weight > 0:
            from flexvar.tokenizer.perceptual import PerceptualLoss   # torchvision import only when used
            self.perceptual = PerceptualLoss(cfg.perceptual_weights_path).to(device)
        self.disc = self.disc_opt = self.disc_loss = None
        if cfg.gan_weight > 0:
            self.disc = PatchDiscriminator().to(device).train()
            if distributed.active() and device.type == "cuda":   # batch statistics over the global batch
                self.disc = nn.SyncBatchNorm.convert_sync_batchnorm(self.disc)
            self.disc_opt = make_adamw(self.disc, cfg)
            self.disc_loss = distributed.wrap(DiscriminatorLoss(self.disc, self.precision), "ddp", device)
        self.step_forward = distributed.wrap(ScalesForward(self.model, self.precision), "ddp", device)
        self.gen = torch.Generator().manual_seed(seed)        # scale draws
        self.step = 0
        self.identity = {"tokenizer": model_cfg.model_dump(mode="json"), "train": cfg.model_dump(mode="json"),
                         "seed": seed, "data": self.data.fingerprint()}

    # ------------------------------------------------------------------ data
    def next_batch(self) -> torch.Tensor:
        """This worker's part of global batch `self.step` (uint8): a fresh seeded permutation each epoch,
        last partial batch dropped, read (and decoded, for on-disk data) by the DataLoader's workers."""
        if self._batches is None:
            rank, world = distributed.rank_world()
            sampler = StepBatchSampler(len(self.data), self.cfg.batch_size, self.seed, start_step=self.step,
                                       rank=rank, world=world)
            self._batches = iter(self.data.loader(sampler, self.num_workers))
        images_BCHW, _ = next(self._batches)
        return images_BCHW

    def close(self) -> None:
        """Stop the DataLoader's worker processes (a new loader starts at the current step when needed)."""
        self._batches = None

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One optimiser step on one global batch at K random scales; returns scalar logs.

        This worker's share of the batch runs as `self.accum` micro-batches of `self.micro_batch` images
        (gradients summed, communicated on the last); the discriminator steps likewise afterwards."""
        cfg, f = self.cfg, self.model.downsample
        share = to_unit_range(self.next_batch()).to(self.device)   # this worker's share of the global batch
        distributed.seed_rank_step(self.seed, self.step)       # multi-worker: rank-distinct dropout
        gan_on = self.disc is not None and self.step >= cfg.gan_start_step
        full_hw = (share.shape[-2] // f, share.shape[-1] // f)   # the encoder's latent size
        scales = sample_scales(max(full_hw), cfg.num_scales, self.gen)
        hws = [scale_hw(s, full_hw) for s in scales]
        logs: dict[str, float | torch.Tensor] = {}   # tensors until the end: one device->host copy per step
        chunks = share.split(self.micro_batch)
        pairs_per_chunk, loss = [], share.new_zeros(())
        self.opt.zero_grad(set_to_none=True)
        for i, x in enumerate(chunks):
            with distributed.grad_sync(self.step_forward, last=i == len(chunks) - 1):   # DDP: sync on the last
                total, pairs = self.generator_loss(x, scales, hws, gan_on, logs, weight=1 / len(chunks))
                (total / len(chunks)).backward()
            loss = loss + total.detach() / len(chunks)
            pairs_per_chunk.append(pairs)
        grad_norm = distributed.clipped_step(self.opt, self.model.parameters(), cfg.grad_clip)
        if cfg.grad_clip > 0:
            logs["grad_norm"] = grad_norm
        if gan_on:
            logs["d_loss"] = self.disc_step(pairs_per_chunk)
        logs["lr"] = self.opt.param_groups[0]["lr"]
        self.sched.step()
        self.update_ema()
        self.step += 1
        logs["loss"] = loss
        on_device = [k for k, v in logs.items() if torch.is_tensor(v)]
        logs.update(zip(on_device, torch.stack([logs[k].double().reshape(()) for k in on_device]).tolist()))
        logs["loss"] = distributed.mean_across(logs["loss"])
        return logs

    def generator_loss(self, x: torch.Tensor, scales: list[int], hws: list[tuple[int, int]], gan_on: bool,
                       logs: dict, weight: float) -> tuple[torch.Tensor, list]:
        """The VQVAE loss of one micro-batch over every scale (mean over scales), its terms added to `logs`
        x `weight`, and the (target, detached reconstruction) pairs the discriminator step needs."""
        cfg, f = self.cfg, self.model.downsample
        total = x.new_zeros(())
        pairs = []
        for s, hw, (rec, q) in zip(scales, hws, self.step_forward(x, hws)):   # DDP: gradients sync in backward
            target = resize_images(x, (hw[0] * f, hw[1] * f))
            terms = {"recon": recon_loss(rec, target, cfg.recon_loss), "codebook": q["codebook"],
                     "commit": q["commit"]}
            if "entropy" in q:
                terms["entropy"] = q["entropy"]
            if self.perceptual is not None:
                with autocast_ctx(self.device, self.precision):
                    terms["perceptual"] = cfg.perceptual_weight * self.perceptual(rec, target).float().mean()
            if gan_on:
                with autocast_ctx(self.device, self.precision):
                    terms["g_adv"] = cfg.gan_weight * hinge_g_loss(self.disc(rec).float())
                pairs.append((target, rec.detach()))
            total = total + sum(terms.values()) / len(scales)
            for k, v in {**terms, "perplexity": q["perplexity"], "usage": q["usage"]}.items():
                part = v.detach().double() / len(scales) * weight
                logs[k] = logs[k] + part if k in logs else part
            rec_s = terms["recon"].detach() * weight
            logs[f"recon_s{s}"] = logs[f"recon_s{s}"] + rec_s if f"recon_s{s}" in logs else rec_s
        return total, pairs

    def disc_step(self, pairs_per_chunk: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> float:
        """One discriminator update on (real, reconstructed) images of every scale of this step, one
        micro-batch at a time (gradients summed, communicated on the last)."""
        self.disc_opt.zero_grad(set_to_none=True)
        loss = 0.0
        for i, pairs in enumerate(pairs_per_chunk):
            with distributed.grad_sync(self.disc_loss, last=i == len(pairs_per_chunk) - 1):
                part = self.disc_loss(pairs) / len(pairs_per_chunk)
                part.backward()
            loss += float(part.detach())
        distributed.clipped_step(self.disc_opt, self.disc.parameters(), self.cfg.grad_clip)
        return loss

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def final_weights(self) -> dict[str, torch.Tensor]:
        """The weights to ship: EMA when enabled, else the trained ones."""
        return self.ema.module.state_dict() if self.ema is not None else self.model.state_dict()

    # ------------------------------------------------------------------ save / resume
    def state(self) -> dict:
        state = {"kind": TRAIN_CKPT_KIND, "config": self.identity, "step": self.step,
                 "model": self.model.state_dict(), "optim": self.opt.state_dict(),
                 "sched": self.sched.state_dict(), "gen": self.gen.get_state(), "rng": capture_rng()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.disc is not None:
            state["disc"], state["disc_optim"] = self.disc.state_dict(), self.disc_opt.state_dict()
        return state

    def save(self, path: str | os.PathLike) -> None:
        save_atomic(self.state(), path)

    def resume(self, path: str | os.PathLike) -> bool:
        """Restore from `path` if it exists; a corrupt or mismatched file raises CheckpointError naming it."""
        if not Path(path).is_file():
            return False
        ckpt = load_checkpoint(path, kind=TRAIN_CKPT_KIND, expect={"config": self.identity},
                               map_location=self.device)
        self.load_state(ckpt)
        return True

    def load_state(self, ckpt: dict) -> None:
        """Restore everything `state()` captured."""
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optim"])
        self.sched.load_state_dict(ckpt["sched"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        if self.disc is not None:
            self.disc.load_state_dict(ckpt["disc"])
            self.disc_opt.load_state_dict(ckpt["disc_optim"])
        self.gen.set_state(ckpt["gen"].cpu())
        self.step = int(ckpt["step"])
        self._batches = None   # the data restarts at the restored step
        restore_rng(ckpt["rng"])

    # ------------------------------------------------------------------ the loop
    def fit(self, logger: RunLogger | None = None, val_images_NCHW: torch.Tensor | None = None,
            ckpt_path: str | os.PathLike | None = None, val_logger: RunLogger | None = None,
            progress=None) -> None:
        """Train until `cfg.steps`, logging every `log_every`, evaluating every `eval_every` and
        checkpointing every `checkpoint_every` steps (and at the end)."""
        cfg, logger, val_logger = self.cfg, logger or RunLogger(), val_logger or logger or RunLogger()
        main = distributed.is_main()   # rank 0 alone logs, evaluates and writes the checkpoint
        full = None
        if distributed.active():   # multi-worker: all workers continue from rank 0's (possibly resumed) state
            self.load_state(distributed.from_main(self.state()))
        while self.step < cfg.steps:
            logs = self.train_step()
            if main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                logger.log_metrics(logs, step=self.step)
                if progress:
                    progress(self.step, logs)
            if main and val_images_NCHW is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                full = full or max(self.data.image_hw) // self.model.downsample
                ev = evaluate_scales(self.model, val_images_NCHW, list(range(1, full + 1)), self.device,
                                     self.precision)
                val_logger.log_metrics({**{f"val_psnr_s{s}": e.psnr for s, e in ev["per_scale"].items()},
                                        "val_usage": ev["usage"]}, step=self.step)
            if main and ckpt_path is not None and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self.save(ckpt_path)
        self.close()


@torch.no_grad()
def recon_grid(model: VQVAE, images_NCHW: torch.Tensor, scales: list[int], device: torch.device) -> torch.Tensor:
    """The paper's Fig. 3 view: one row per image, columns = input then its reconstruction at each
    scale, each shown at the input's size (nearest upsampling). Returns uint8 (3, rows*H, cols*W)."""
    from einops import rearrange

    from flexvar.data.splits import to_uint8

    was_training = model.training
    model.eval()
    x = to_unit_range(images_NCHW).to(device)
    z = model.encode(x)
    cols = [x]
    for s in scales:
        rec = model.reconstruct(x, scale_hw(s, tuple(z.shape[-2:])))
        cols.append(F.interpolate(rec.clamp(-1, 1), size=x.shape[-2:], mode="nearest"))
    model.train(was_training)
    grid_RCchw = torch.stack(cols, dim=1)
    return to_uint8(rearrange(grid_RCchw, "r c ch h w -> ch (r h) (c w)").cpu())
