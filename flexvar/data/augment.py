"""Image geometry of the official data pipeline: ADM's resize, centre crop and random crop + flip.

Official FlexVAR (dataset/imagenet.py, dataset/augmentation.py, from ADM's guided-diffusion) trains on
    RandomHorizontalFlip() -> random_crop_arr(image, 256)   (min_crop_frac 0.88, max_crop_frac 1.0)
and evaluates / extracts on center_crop_arr(image, 256). Both resize the short side with ADM's
two-step resize (BOX halvings while the image is at least twice the target, then one bicubic resize
to round(side * scale)), which also enlarges images smaller than the target. The functions below
compute the same pixels from the same random draws (tests/test_augment_conformance.py compares them
with the official function); the draws come from a `random.Random`, in the official order:
the short side, then the crop's row, then its column.

`data.augment` (flexvar/config.py) picks what training sees:
- center:   `prepare` stores the centre crop at `data.resolution`; the latent cache holds it and its flip;
- official: `prepare` stores the image with its short side at ceil(resolution / MIN_CROP_FRAC) (291 for
  256: every crop the official function can draw lies inside it), and the latent cache holds
  `data.augment_views` official views per image (flip, then random crop), each drawn from its own
  seeded generator; training reads one view of an image per step.
Everything else (tokenizer training, references, evaluation) reads `center_crop` of the stored image.
"""
from __future__ import annotations

import io
import math
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

MIN_CROP_FRAC, MAX_CROP_FRAC = 0.88, 1.0     # official random_crop_arr defaults: crops of 88-100% of the short side


def stored_short_side(resolution: int, augment: str) -> int:
    """Short side `prepare` keeps: the training resolution (center) or enough to crop from (official)."""
    return math.ceil(resolution / MIN_CROP_FRAC) if augment == "official" else resolution


def resize_short(img: Image.Image, short: int) -> Image.Image:
    """ADM's resize of the short side to `short`: halve with BOX filtering while the image is at least
    twice as large, then one bicubic resize of both sides by the same scale (rounded); enlarges small images."""
    while min(img.size) >= 2 * short:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
    scale = short / min(img.size)
    return img.resize(tuple(round(s * scale) for s in img.size), resample=Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's center_crop_arr: short side resized to `size`, then the centre size x size square."""
    img = resize_short(img, size)
    top, left = (img.height - size) // 2, (img.width - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_crop(img: Image.Image, size: int, rng: random.Random, min_frac: float = MIN_CROP_FRAC,
                max_frac: float = MAX_CROP_FRAC) -> tuple[Image.Image, tuple[int, int, int]]:
    """ADM's random_crop_arr with draws from `rng`: short side resized to a uniform integer in
    [ceil(size / max_frac), ceil(size / min_frac)], then a uniform size x size window.
    Returns (crop, (short side, top, left))."""
    short = rng.randrange(math.ceil(size / max_frac), math.ceil(size / min_frac) + 1)
    img = resize_short(img, short)
    top = rng.randrange(img.height - size + 1)
    left = rng.randrange(img.width - size + 1)
    return img.crop((left, top, left + size, top + size)), (short, top, left)


def view_rng(seed: int, index: int, view: int) -> random.Random:
    """The generator of view `view` of image `index`: the same view on any worker, in any order."""
    return random.Random(f"flexvar-augment:{seed}:{index}:{view}")


def official_view(img: Image.Image, size: int, rng: random.Random, flip: bool | None = None) -> Image.Image:
    """One official training view: a horizontal flip with probability 1/2 (drawn first from `rng`
    unless given), then the random crop with the next draws of `rng`."""
    if flip is None:
        flip = rng.random() < 0.5
    return random_crop(ImageOps.mirror(img) if flip else img, size, rng)[0]


class AugmentedViews(Dataset):
    """The official views of an on-disk split as a map-style Dataset: key k = view k % V of image k // V,
    uint8 (B, 3, size, size) per batch of keys (decoded and cropped in the DataLoader's workers)."""

    def __init__(self, split, views: int, size: int, seed: int):
        if split.arrow is None:
            raise ValueError("AugmentedViews reads the stored images: load the split with in_memory_mb=0")
        self.split, self.views, self.size, self.seed = split, views, size, seed

    def __len__(self) -> int:
        return len(self.split) * self.views

    def __getitems__(self, keys: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keys_B = torch.as_tensor(keys, dtype=torch.long)
        idx_B, view_B = keys_B // self.views, keys_B % self.views
        blobs = self.split.arrow.take(idx_B.tolist())
        crops = [np.asarray(official_view(Image.open(io.BytesIO(b)).convert("RGB"), self.size,
                                          view_rng(self.seed, i, v)))
                 for b, i, v in zip(blobs, idx_B.tolist(), view_B.tolist())]
        images_BCHW = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
        return images_BCHW, self.split.labels_N[idx_B]

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        images_BCHW, labels_B = self.__getitems__([key])
        return images_BCHW[0], labels_B[0]


def views_loader(split, views: int, size: int, seed: int, batch_images: int, num_workers: int = 0):
    """DataLoader over all official views in order, `batch_images` images (x `views` views) per batch:
    (uint8 (B*V, 3, size, size) image-major, labels (B*V,))."""
    from torch.utils.data import DataLoader

    from flexvar.data.sampling import RangeBatchSampler

    return DataLoader(AugmentedViews(split, views, size, seed), collate_fn=_as_is, num_workers=num_workers,
                      batch_sampler=RangeBatchSampler(len(split) * views, batch_images * views),
                      prefetch_factor=2 if num_workers else None, generator=torch.Generator().manual_seed(0))


def _as_is(batch):
    return batch
