"""Image grids for docs, reports and MLflow artifacts."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw


def image_grid(images_NCHW: torch.Tensor, ncol: int, pad: int = 2) -> Image.Image:
    """uint8 (N, 3, H, W) -> one PIL image, row-major with `ncol` columns (kept even for fewer images),
    `pad` white pixels between images and none around them: rows*H + (rows-1)*pad pixels tall, and
    one image is returned at its own size."""
    n, rows = len(images_NCHW), max(1, math.ceil(len(images_NCHW) / ncol))
    blank = images_NCHW.new_full((rows * ncol - n, *images_NCHW.shape[1:]), 255)   # fill the last row
    tiles_NCHW = F.pad(torch.cat([images_NCHW, blank]), (0, pad, 0, pad), value=255)   # pad right and bottom
    grid_CHW = rearrange(tiles_NCHW, "(r c) ch h w -> ch (r h) (c w)", c=ncol)
    grid_CHW = grid_CHW[:, :grid_CHW.shape[1] - pad, :grid_CHW.shape[2] - pad]   # no pad after the last row/column
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
