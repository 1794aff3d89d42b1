"""Load a prepared split into memory as uint8 tensors: at this scale the whole set fits in RAM
and decoding once beats a per-step dataloader on 2 cores."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class ImageSplit:
    images_NCHW: torch.Tensor   # uint8, (N, 3, H, W)
    labels_N: torch.Tensor      # int64, (N,)
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels_N)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def to_unit_range(images_NCHW: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the tokenizer's input range."""
    return images_NCHW.float().div(127.5).sub(1.0)


def to_uint8(x_NCHW: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return x_NCHW.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def load_split(prepared_dir: str | os.PathLike, split: str) -> ImageSplit:
    """Read `split` ('train' or 'val') of the prepare stage's output."""
    import datasets

    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"{prepared_dir} is not a prepared dataset; run the prepare stage (dvc repro prepare)")
    ds = datasets.load_from_disk(str(prepared_dir))[split].with_format("numpy")
    images = np.stack([np.asarray(img) for img in ds["image"]]) if len(ds) else np.zeros((0, 1, 1, 3), np.uint8)
    return ImageSplit(
        images_NCHW=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels_N=torch.as_tensor(np.asarray(ds["label"]), dtype=torch.int64),
        class_names=list(ds.features["label"].names),
    )


def load_stats(prepared_dir: str | os.PathLike) -> dict:
    return json.loads((Path(prepared_dir) / "stats.json").read_text())
