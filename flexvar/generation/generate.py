"""Class-conditional generation: any schedule, size and aspect ratio, with a KV cache.

One step per scale (h_k, w_k), coarse to fine. Step k feeds the transformer the previous
scale's code vectors brought to (h_k, w_k) (bicubic, ground-truth mode; or the running residual
canvas in VAR mode, flexvar/transformer/teacher_forcing.py), reads logits for every position of scale k,
guides them (flexvar/generation/sampling.py) and samples scale k's token map. The last map is decoded by
the tokenizer at its own (h, w), so the image is (f h_K, f w_K) pixels — 2x the training size
or non-square just by choosing the scales.

With `use_kv_cache` each step attends to cached keys/values of earlier steps; without it every
step reruns the whole block-causal prefix (slow, for checking). `forced` teacher-forces given
tokens at chosen positions of chosen steps: that is all image-to-image needs (flexvar/generation/editing.py).

How each token is drawn is one `SamplingSettings` (flexvar/config.py: guidance, its schedule,
top-k/top-p, greedy rule, precision), the object the sample stage and the CLI build from params /
arguments and record as it is. Schedules (the `scales` passed in) come from flexvar/schedules.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm.auto import tqdm

from flexvar.device import autocast_cache_scope, autocast_ctx
from flexvar.tokenizer.bf16_copy import decode_latents
from flexvar.config import SamplingSettings
from flexvar.generation.sampling import greedy_step, guidance_scale, guide, sample_tokens
from flexvar.schedules import Scales, check_scales
from flexvar.transformer.teacher_forcing import ResidualCanvas, gt_next_input

Forced = list[tuple[torch.Tensor, torch.Tensor] | None]   # per step: (ids_Bhw, force_Bhw bool) or None


# --------------------------------------------------------------------------- generation
@dataclass
class Generation:
    """What one generation returns (CPU tensors)."""
    scales: Scales
    labels: torch.Tensor               # (N,) int64
    tokens: list[torch.Tensor]         # per step (N, h, w) int64
    images: torch.Tensor | None        # (N, 3, f H, f W) float in [-1, 1], None without decode


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """An explicit generator for sampling (never the global RNG): same seed -> same images."""
    return torch.Generator(device=device).manual_seed(int(seed))


def _next_input(prediction: str, zq_BChw: torch.Tensor, next_hw, canvas: ResidualCanvas | None) -> torch.Tensor:
    if prediction == "residual":
        canvas.add(zq_BChw)
        return canvas.next_input(next_hw)
    return gt_next_input(zq_BChw, next_hw)


@torch.no_grad()
def generate_batch(model, vqvae, labels_B: torch.Tensor, scales: Scales, sampling: SamplingSettings, *,
                   train_side: int | None = None, generator: torch.Generator | None = None,
                   use_kv_cache: bool = True, forced: Forced | None = None, decode: bool = True,
                   progress: bool = False) -> Generation:
    """Generate one batch (see the module docstring) drawn as `sampling` says.

    guidance > 0 runs a conditional and an unconditional (null-class) half; t per step from
    `guidance_scale`. Scales with a long side above `train_side` (outside the trained range)
    get the full guidance; `greedy_rule` (sampling.greedy_step) says which steps take greedy tokens.
    `forced[k]`, when given, replaces step k's sampled ids by its ids where its mask is True.
    """
    s, precision = sampling, sampling.precision
    device = next(model.parameters()).device
    prediction = model.cfg.prediction
    B, n = len(labels_B), len(scales)
    labels_B = labels_B.to(device)
    guided = s.guidance > 0
    lab = torch.cat([labels_B, torch.full_like(labels_B, model.num_classes)]) if guided else labels_B
    reps = 2 if guided else 1
    quant = vqvae.quantize
    canvas = ResidualCanvas(B, quant.codebook_dim, scales[-1], device) if prediction == "residual" else None
    tokens, inputs = [], []          # inputs: per step >= 1 its (2B, h*w, Cvae) input (no-cache path)
    x_in = None
    model.enable_kv_cache(use_kv_cache)
    try:
        with autocast_cache_scope(device):   # weights cast to bf16 once per batch, not per step
            with autocast_ctx(device, precision):
                cond_BD = model.class_cond(lab)
            for k, hw in enumerate(tqdm(scales, desc="scales", leave=False, disable=not progress)):
                with autocast_ctx(device, precision):
                    if use_kv_cache:
                        logits = model.step_logits(model.step_input(cond_BD, hw, x_in), cond_BD)
                    else:
                        x_BLCv = torch.cat(inputs, 1) if inputs else torch.zeros(B * reps, 0, quant.codebook_dim,
                                                                                device=device)
                        logits = model(lab, x_BLCv, scales[:k + 1])[:, -hw[0] * hw[1]:]
                outside = train_side is not None and max(hw) > train_side
                t = s.guidance if outside else guidance_scale(s.guidance, k, n, s.guidance_schedule)
                logits_BlV = guide(logits.float(), t) if guided else logits.float()
                greedy = greedy_step(hw, train_side, s.greedy_rule)
                idx_Bl = sample_tokens(logits_BlV, 1 if greedy else s.top_k, s.top_p, generator)
                idx_Bhw = idx_Bl.view(B, *hw)
                if forced is not None and forced[k] is not None:
                    ids, mask = forced[k]
                    idx_Bhw = torch.where(mask.to(device), ids.to(device), idx_Bhw)
                tokens.append(idx_Bhw)
                if k + 1 < n:
                    x_in = _next_input(prediction, quant.lookup(idx_Bhw), scales[k + 1], canvas).repeat(reps, 1, 1)
                    inputs.append(x_in)
    finally:
        model.enable_kv_cache(False)
    images = decode_tokens(vqvae, tokens[-1], canvas, precision) if decode else None
    return Generation(scales, labels_B.cpu(), [t.cpu() for t in tokens], images)


@torch.no_grad()
def decode_tokens(vqvae, idx_Bhw: torch.Tensor, canvas: ResidualCanvas | None = None,
                  precision: str = "fp32") -> torch.Tensor:
    """Final token map (or the residual canvas f_hat) -> images (B, 3, f h, f w) in [-1, 1], CPU fp32.

    In bf16 the decoder runs as flexvar/tokenizer/bf16_copy.py builds it (a cached bf16 channels-last
    copy with sub-pixel upsampling, in chunks on CPU); fp32 runs the tokenizer's own decoder.
    """
    z_BChw = canvas.f_hat if canvas is not None else vqvae.quantize.lookup(idx_Bhw)
    return decode_latents(vqvae, z_BChw, precision).clamp_(-1, 1).cpu()


def generate(model, vqvae, labels_N: torch.Tensor, scales: Scales, sampling: SamplingSettings, *,
             batch_size: int = 32, seed: int = 0, progress: bool = False, **kwargs) -> Generation:
    """Generate len(labels_N) images in batches of `batch_size` with one seeded generator.

    Keyword arguments go to `generate_batch` (train_side, forced, decode ... ; `forced` ids/masks are
    indexed per batch, so pass them with a leading N dimension).
    """
    parts = list(generate_batches(model, vqvae, labels_N, scales, sampling, batch_size=batch_size, seed=seed,
                                  progress=progress, **kwargs))
    return Generation(
        scales=check_scales(scales),
        labels=torch.cat([p.labels for p in parts]),
        tokens=[torch.cat([p.tokens[k] for p in parts]) for k in range(len(scales))],
        images=None if parts[0].images is None else torch.cat([p.images for p in parts]),
    )


def generate_batches(model, vqvae, labels_N: torch.Tensor, scales: Scales, sampling: SamplingSettings, *,
                     batch_size: int = 32, seed: int = 0, progress: bool = False, start: int = 0,
                     generator: torch.Generator | None = None, **kwargs) -> Iterator[Generation]:
    """`generate`, one batch at a time (same seeded generator, same images): callers that write each
    batch to disk keep memory bounded by the batch, whatever len(labels_N).

    Resuming: `start` skips the first `start` batches and `generator` continues the random stream
    (a generator whose state was saved after batch start - 1); the batches then equal those of one
    uninterrupted run."""
    device = next(model.parameters()).device
    gen = generator if generator is not None else make_generator(seed, device)
    forced = kwargs.pop("forced", None)
    starts = range(0, len(labels_N), batch_size)
    for s in tqdm(starts[start:], desc="batches", initial=start, total=len(starts),
                  disable=not progress or len(starts) == 1):
        sl = slice(s, s + batch_size)
        f = None if forced is None else [None if x is None else (x[0][sl], x[1][sl]) for x in forced]
        yield generate_batch(model, vqvae, labels_N[sl], scales, sampling, generator=gen, forced=f,
                             progress=progress and len(starts) == 1, **kwargs)


def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """[0]*per_class + [1]*per_class + ... (N = num_classes * per_class), int64."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def grid_columns(n: int) -> int:
    """A near-square number of grid columns for n images."""
    return max(1, math.ceil(math.sqrt(n)))


__all__ = ["Generation", "generate", "generate_batch", "generate_batches", "decode_tokens", "make_generator", "class_labels"]
