"""Image grids for docs, reports and MLflow artifacts."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw

GRID_MAX_CLASSES = 16   # a class grid shows at most this many classes, chosen evenly (ImageNet has 1,000)
LABEL_WIDTH = 72        # pixels left of a class grid for the class names


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


def shown_classes(num_classes: int, max_classes: int = GRID_MAX_CLASSES) -> list[int]:
    """At most `max_classes` class ids spread evenly over 0 .. num_classes-1, first and last included."""
    k = min(num_classes, max_classes)
    return torch.linspace(0, num_classes - 1, k).round().long().tolist() if k > 1 else list(range(k))


def class_grid_size(num_rows: int, per_class: int, h: int, w: int, pad: int = 2,
                    label_width: int = LABEL_WIDTH) -> tuple[int, int]:
    """(height, width) in pixels of a class grid with `num_rows` classes of `per_class` (h, w) images."""
    return num_rows * (h + pad) - pad, label_width + per_class * (w + pad) - pad


def class_grid(images_NCHW: torch.Tensor, labels_N: torch.Tensor, class_names: list[str], per_class: int,
               classes: list[int] | None = None, label_width: int = LABEL_WIDTH) -> Image.Image:
    """One row per shown class (first `per_class` images of it), class name written on the left.
    `classes` (default: at most GRID_MAX_CLASSES chosen evenly) bounds the grid whatever the class count."""
    classes = shown_classes(len(class_names)) if classes is None else classes
    h = images_NCHW.shape[-2]
    rows = []
    for c in classes:
        sel = images_NCHW[labels_N == c][:per_class]
        if len(sel) < per_class:
            sel = torch.cat([sel, torch.full((per_class - len(sel), *images_NCHW.shape[1:]), 255, dtype=torch.uint8)])
        rows.append(sel)
    grid = image_grid(torch.cat(rows), ncol=per_class)
    out = Image.new("RGB", (grid.width + label_width, grid.height), "white")
    out.paste(grid, (label_width, 0))
    draw = ImageDraw.Draw(out)
    for r, c in enumerate(classes):
        draw.text((4, r * (h + 2) + h // 2 - 5), class_names[c][:11], fill="black")
    return out
