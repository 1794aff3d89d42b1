"""Image-to-image without retraining (paper §4.4): refine, in-paint, out-paint, extend.

All four are generation with teacher forcing. An image is encoded to its continuous latent z;
at every step whose scale it covers, the tokens it determines are forced (z area-downsampled to
that scale, snapped to the codebook — exactly the ground-truth tokens the model was trained to
predict) and only the other positions are sampled. Because step k+1's input is built from
step k's whole map, sampled regions see the forced content at every scale and blend with it.

- refine: force every position of the scales up to the image's own latent size, then keep
  going to a larger final scale (the image re-synthesised at, e.g., 2x).
- in-paint / out-paint: a mask (True = generate) in pixels; a token is forced only when its
  whole area lies outside the mask at that scale, so no token ever mixes in unknown pixels.
- extend: a larger canvas (e.g. 1:2), the image's latent in the centre, the rest generated.

Masks come from a PNG (white = generate) or a box x0,y0,x1,y1 (`load_mask`, `box_mask`).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flexvar.generation.generate import Forced, Generation, Scales, generate
from flexvar.tokenizer.quantizer import downsample
from flexvar.errors import FlexvarError


class MaskError(FlexvarError, ValueError):
    """A mask or box that cannot be used; the message says why."""


# --------------------------------------------------------------------------- masks
def box_mask(box: tuple[int, int, int, int], size_hw: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool, True inside the pixel box [x0, x1) x [y0, y1)."""
    x0, y0, x1, y1 = box
    H, W = size_hw
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise MaskError(f"box {x0},{y0},{x1},{y1} must satisfy 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H}")
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def load_mask(path: str | os.PathLike, size_hw: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool from a PNG (any mode; bright = True), resized nearest to `size_hw`.

    The mask must have the image's aspect ratio: stretching a mask of another shape would move
    the region it marks, so that is refused rather than guessed.
    """
    img = _open_image(path, "L", MaskError, "mask")
    if abs(img.size[0] * size_hw[0] - img.size[1] * size_hw[1]) > 0.01 * img.size[1] * size_hw[1]:
        raise MaskError(f"mask {path} is {img.size[0]}x{img.size[1]} (WxH), not the image's shape "
                        f"{size_hw[1]}x{size_hw[0]} (or a multiple of it); give a mask of the image's size")
    if img.size != (size_hw[1], size_hw[0]):
        img = img.resize((size_hw[1], size_hw[0]), Image.NEAREST)
    return torch.from_numpy(np.asarray(img) >= 128)


def check_mask(generate_HW: torch.Tensor) -> torch.Tensor:
    """A generate-mask must leave something to keep and something to generate."""
    if not generate_HW.any():
        raise MaskError("the mask selects nothing to generate (all black / empty box)")
    if generate_HW.all():
        raise MaskError("the mask covers the whole image: nothing is kept (use `generate` instead)")
    return generate_HW


def known_fraction(known_BHW: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Fraction (B, h, w) of each scale-(h, w) token's area that is known (area resize)."""
    return downsample(known_BHW[:, None].float(), hw)[:, 0]


def latent_known(keep_BHW: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Pixel keep-mask (B, H, W) -> latent keep-mask: a latent cell is known when all its pixels are."""
    return known_fraction(keep_BHW, latent_hw) > 1.0 - 1e-6


# --------------------------------------------------------------------------- forcing
@torch.no_grad()
def forced_tokens(quantizer, z_BCHW: torch.Tensor, known_BHW: torch.Tensor | None, scales: Scales) -> Forced:
    """Per step, the ground-truth ids of z at that scale and where to force them.

    Steps larger than z (in either side) force nothing. With `known_BHW` (latent resolution,
    True = known), a token is forced only when all of its area is known; unknown latent cells
    are zeroed first so they cannot leak into the forced ids.
    """
    H, W = z_BCHW.shape[-2:]
    if known_BHW is not None:
        z_BCHW = z_BCHW * known_BHW[:, None].to(z_BCHW.dtype)
    out: Forced = []
    for hw in scales:
        if hw[0] > H or hw[1] > W:
            out.append(None)
            continue
        ids_Bhw = quantizer.nearest(downsample(z_BCHW, hw))
        if known_BHW is None:
            mask_Bhw = torch.ones_like(ids_Bhw, dtype=torch.bool)
        else:
            mask_Bhw = known_fraction(known_BHW, hw) > 1.0 - 1e-6
        out.append((ids_Bhw.cpu(), mask_Bhw.cpu()) if mask_Bhw.any() else None)
    return out


@torch.no_grad()
def encode(vqvae, images_B3HW: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> continuous latent (B, Cvae, H/f, W/f), fp32, on the tokenizer's device."""
    device = next(vqvae.parameters()).device
    return vqvae.encode(images_B3HW.to(device).float())


class EditError(FlexvarError, ValueError):
    """An edit this model or these inputs cannot do (e.g. a residual-prediction model)."""


def _check_ground_truth(model) -> None:
    """Forcing ground-truth tokens only makes sense when the model predicts them (not VAR residuals)."""
    if model.cfg.prediction != "gt":
        raise EditError("image-to-image needs a ground-truth (FlexVAR) model; this one predicts VAR residuals")


def _batch_mask(mask_HW: torch.Tensor, B: int) -> torch.Tensor:
    return mask_HW.expand(B, *mask_HW.shape[-2:]) if mask_HW.dim() == 2 else mask_HW


# --------------------------------------------------------------------------- the four edits
def refine(model, vqvae, images_B3HW: torch.Tensor, labels_B: torch.Tensor, scales: Scales, **kw) -> Generation:
    """Force the image's tokens at every scale it covers, sample the larger ones (final scale > image)."""
    _check_ground_truth(model)
    z = encode(vqvae, images_B3HW)
    if not any(hw[0] > z.shape[-2] or hw[1] > z.shape[-1] for hw in scales):
        raise ValueError(f"refine needs a final scale larger than the image's latent {tuple(z.shape[-2:])}; "
                         f"got {scales[-1]}")
    return generate(model, vqvae, labels_B, scales, forced=forced_tokens(vqvae.quantize, z, None, scales), **kw)


def inpaint(model, vqvae, images_B3HW: torch.Tensor, generate_HW: torch.Tensor, labels_B: torch.Tensor,
            scales: Scales, **kw) -> Generation:
    """Regenerate the masked region (True = generate), keep the rest; final scale = the image's latent."""
    _check_ground_truth(model)
    z = encode(vqvae, images_B3HW)
    if tuple(scales[-1]) != tuple(z.shape[-2:]):
        raise ValueError(f"the final scale {scales[-1]} must equal the image's latent size {tuple(z.shape[-2:])}")
    keep = ~_batch_mask(check_mask(generate_HW), len(images_B3HW)).to(z.device)
    known = latent_known(keep, tuple(z.shape[-2:]))
    if not known.any():
        raise MaskError("no latent cell lies fully outside the mask: nothing would be kept")
    return generate(model, vqvae, labels_B, scales, forced=forced_tokens(vqvae.quantize, z, known, scales), **kw)


def outpaint(model, vqvae, images_B3HW: torch.Tensor, keep_HW: torch.Tensor, labels_B: torch.Tensor,
             scales: Scales, **kw) -> Generation:
    """Keep the masked region (True = keep), generate everything around it."""
    return inpaint(model, vqvae, images_B3HW, ~keep_HW, labels_B, scales, **kw)


def extend(model, vqvae, images_B3HW: torch.Tensor, labels_B: torch.Tensor, scales: Scales, **kw) -> Generation:
    """A larger canvas (the final scale) with the image's latent in its centre; the rest is generated."""
    _check_ground_truth(model)
    z = encode(vqvae, images_B3HW)
    B, C, h, w = z.shape
    Hc, Wc = scales[-1]
    if Hc < h or Wc < w or (Hc, Wc) == (h, w):
        raise ValueError(f"the canvas latent {Hc}x{Wc} must contain the image's latent {h}x{w} and be larger")
    top, left = (Hc - h) // 2, (Wc - w) // 2
    canvas = z.new_zeros(B, C, Hc, Wc)
    canvas[:, :, top:top + h, left:left + w] = z
    known = torch.zeros(B, Hc, Wc, dtype=torch.bool, device=z.device)
    known[:, top:top + h, left:left + w] = True
    return generate(model, vqvae, labels_B, scales, forced=forced_tokens(vqvae.quantize, canvas, known, scales), **kw)


def _open_image(path: str | os.PathLike, mode: str, error: type[Exception], what: str) -> Image.Image:
    """Decode a whole image file (truncated, non-image and decompression-bomb files are `error`s)."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise error(f"cannot read {what} {path}: {e}") from None


def load_image(path: str | os.PathLike, size_hw: tuple[int, int]) -> torch.Tensor:
    """(1, 3, H, W) float in [-1, 1] from an image file, resized (bicubic) to `size_hw`."""
    img = _open_image(path, "RGB", EditError, "image")
    if img.size != (size_hw[1], size_hw[0]):
        img = img.resize((size_hw[1], size_hw[0]), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
    return x.float().div(127.5).sub(1.0)


def mask_overlay(images_uint8_N3HW: torch.Tensor, generate_HW: torch.Tensor) -> torch.Tensor:
    """Darken the region to be generated (for showing inputs next to results)."""
    m = generate_HW.to(torch.bool)[None, None]
    dark = (images_uint8_N3HW.float() * 0.35).to(torch.uint8)
    return torch.where(m, dark, images_uint8_N3HW)


def pad_center(images_uint8_N3HW: torch.Tensor, size_hw: tuple[int, int], value: int = 255) -> torch.Tensor:
    """Put images in the centre of a larger canvas (for showing extend inputs)."""
    H, W = size_hw
    h, w = images_uint8_N3HW.shape[-2:]
    top, left = (H - h) // 2, (W - w) // 2
    return F.pad(images_uint8_N3HW, (left, W - w - left, top, H - h - top), value=value)


__all__ = ["MaskError", "EditError", "box_mask", "load_mask", "check_mask", "forced_tokens", "latent_known", "refine",
           "inpaint", "outpaint", "extend", "load_image", "mask_overlay", "pad_center"]
