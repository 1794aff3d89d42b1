"""Image grids for docs, reports and MLflow artifacts."""
from __future__ import annotations

import torch
from einops import rearrange
from PIL import Image, ImageDraw
from torchvision.utils import make_grid


def image_grid(images_NCHW: torch.Tensor, ncol: int, pad: int = 2) -> Image.Image:
    """uint8 (N, 3, H, W) -> one PIL image, row-major with `ncol` columns, `pad` white pixels between
    images (torchvision's make_grid, without its outer border)."""
    if len(images_NCHW) < ncol:   # keep `ncol` columns even for fewer images (make_grid would shrink)
        blank = images_NCHW.new_full((ncol - len(images_NCHW), *images_NCHW.shape[1:]), 255)
        images_NCHW = torch.cat([images_NCHW, blank])
    grid_CHW = make_grid(images_NCHW, nrow=ncol, padding=pad, pad_value=255)
    grid_CHW = grid_CHW[:, pad:grid_CHW.shape[1] - pad, pad:grid_CHW.shape[2] - pad]
    return Image.fromarray(rearrange(grid_CHW, "c h w -> h w c").numpy())


def class_grid(images_NCHW: torch.Tensor, labels_N: torch.Tensor, class_names: list[str], per_class: int,
               label_width: int = 72) -> Image.Image:
    """One row per class (first `per_class` images of it), class name written on the left."""
    h = images_NCHW.shape[-2]
    rows = []
    for c in range(len(class_names)):
        sel = images_NCHW[labels_N == c][:per_class]
        if len(sel) < per_class:
            sel = torch.cat([sel, torch.full((per_class - len(sel), *images_NCHW.shape[1:]), 255, dtype=torch.uint8)])
        rows.append(sel)
    grid = image_grid(torch.cat(rows), ncol=per_class)
    out = Image.new("RGB", (grid.width + label_width, grid.height), "white")
    out.paste(grid, (label_width, 0))
    draw = ImageDraw.Draw(out)
    for c, name in enumerate(class_names):
        draw.text((4, c * (h + 2) + h // 2 - 5), name[:11], fill="black")
    return out
