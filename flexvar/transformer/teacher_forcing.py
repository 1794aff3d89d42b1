"""Per-step inputs and targets from one continuous latent: ground-truth (FlexVAR) or residual (VAR).

Ground truth (paper §3.4): step k's target is the latent quantised at scale k; step k+1's input
is that quantised map (l2-normalised code vectors) upsampled bicubic to scale k+1. Every step's
tokens describe the whole image at its own resolution, so any step can end a generation.

Residual (VAR): the latent is explained coarse to fine. Step k quantises what is still
unexplained (f_rest, area-downsampled to scale k); its code vectors, upsampled bicubic to the
final size, are added to the running reconstruction f_hat and subtracted from f_rest. Step k+1's
input is f_hat area-downsampled to scale k+1; the final latent is the sum f_hat.

Generation uses the same rules one step at a time: `gt_next_input`, `ResidualCanvas`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from flexvar.tokenizer.quantizer import MultiScaleQuantizer, downsample, l2norm

Scales = list[tuple[int, int]]


def resize_bicubic(z_BChw: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(z_BChw.shape[-2:]) == tuple(hw):
        return z_BChw
    return F.interpolate(z_BChw, size=tuple(hw), mode="bicubic", align_corners=False)


def flat(z_BChw: torch.Tensor) -> torch.Tensor:
    return rearrange(z_BChw, "b c h w -> b (h w) c")


def gt_next_input(zq_BChw: torch.Tensor, next_hw: tuple[int, int]) -> torch.Tensor:
    """Ground-truth mode: the next step's input (B, h*w, Cvae) from this step's code vectors."""
    return flat(resize_bicubic(zq_BChw, next_hw))


@torch.no_grad()
def gt_inputs_targets(quantizer: MultiScaleQuantizer, z_BCHW: torch.Tensor,
                      scales: Scales) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs (B, L - h1*w1, Cvae) and targets (B, L) of every step, GT mode."""
    inputs, targets = [], []
    for k, hw in enumerate(scales):
        idx_Bhw, zq_BChw = quantizer.quantize(z_BCHW, hw)
        targets.append(idx_Bhw.flatten(1))
        if k + 1 < len(scales):
            inputs.append(gt_next_input(zq_BChw, scales[k + 1]))
    x_BLCv = torch.cat(inputs, dim=1) if inputs else z_BCHW.new_zeros(z_BCHW.shape[0], 0, z_BCHW.shape[1])
    return x_BLCv, torch.cat(targets, dim=1)


class ResidualCanvas:
    """Running VAR reconstruction f_hat (B, Cvae, H, W) at the schedule's final size."""

    def __init__(self, batch: int, dim: int, final_hw: tuple[int, int], device, dtype=torch.float32):
        self.final_hw = tuple(final_hw)
        self.f_hat = torch.zeros(batch, dim, *final_hw, device=device, dtype=dtype)

    def add(self, zq_BChw: torch.Tensor) -> torch.Tensor:
        """Add one step's code vectors (upsampled bicubic to the final size); returns that contribution."""
        h_BCHW = resize_bicubic(zq_BChw.to(self.f_hat.dtype), self.final_hw)
        self.f_hat += h_BCHW
        return h_BCHW

    def next_input(self, next_hw: tuple[int, int]) -> torch.Tensor:
        """The next step's input (B, h*w, Cvae): f_hat area-downsampled to its scale."""
        return flat(downsample(self.f_hat, next_hw))


@torch.no_grad()
def residual_inputs_targets(quantizer: MultiScaleQuantizer, z_BCHW: torch.Tensor,
                            scales: Scales) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs, targets and the summed reconstruction f_hat, residual (VAR) mode.

    The latent is taken at the final scale and l2-normalised per position (the codebook is unit
    norm, so that is what a single code can explain).
    """
    f_rest = l2norm(downsample(z_BCHW.float(), scales[-1]), dim=1)
    canvas = ResidualCanvas(z_BCHW.shape[0], z_BCHW.shape[1], scales[-1], z_BCHW.device)
    inputs, targets = [], []
    for k, hw in enumerate(scales):
        idx_Bhw = quantizer.nearest(downsample(f_rest, hw))
        targets.append(idx_Bhw.flatten(1))
        f_rest = f_rest - canvas.add(quantizer.lookup(idx_Bhw))
        if k + 1 < len(scales):
            inputs.append(canvas.next_input(scales[k + 1]))
    x_BLCv = torch.cat(inputs, dim=1) if inputs else z_BCHW.new_zeros(z_BCHW.shape[0], 0, z_BCHW.shape[1])
    return x_BLCv, torch.cat(targets, dim=1), canvas.f_hat


def inputs_targets(prediction: str, quantizer: MultiScaleQuantizer, z_BCHW: torch.Tensor,
                   scales: Scales) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on `transformer.prediction` ('gt' | 'residual')."""
    if prediction == "gt":
        return gt_inputs_targets(quantizer, z_BCHW, scales)
    if prediction == "residual":
        return residual_inputs_targets(quantizer, z_BCHW, scales)[:2]
    raise ValueError(f"prediction must be 'gt' or 'residual', got {prediction!r}")
