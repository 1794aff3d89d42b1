"""Generate the augmentation conformance references by running the OFFICIAL FlexVAR data pipeline.

    FLEXVAR_OFFICIAL_DIR=/path/to/FlexVAR python tests/conformance/make_augment_references.py

Official training views (dataset/imagenet.py): torchvision RandomHorizontalFlip(), then
dataset/augmentation.py `random_crop_arr(image, final_reso)` (ADM's, min_crop_frac 0.88); the
centre crop is `center_crop_arr`. Both functions are imported from the official folder (only
numpy, PIL and `random` needed); nothing of this project is imported here.

For each input image (seeded uint8 noise of sizes that exercise every branch: smaller than the
crop, BOX halvings, tall, wide, exactly the largest short side) and each seed s:
`random.seed(s); torch.manual_seed(s)`, then the official flip + random crop. Written to
tests/conformance/data/augment_references.npz:
    input_sha256_<i>           sha256 of input image i (the test regenerates it and checks this)
    crop_<i>_<s>, flip_<i>_<s> the official crop (uint8 H x W x 3) and whether the flip fired
    center_<i>                 center_crop_arr(input i)
    cases                      CASES: (width, height, crop size, number of seeds 0..n-1) per input
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

OUT = Path(__file__).resolve().parent / "data" / "augment_references.npz"
# (width, height, crop size, seeds): 64-px crops (ceil(64 / 0.88) = 73: short sides 64..73) on every branch
# (smaller than the crop, one and two BOX halvings, tall, wide, exactly 73), and the paper's 256 (short sides 256..291)
CASES = [(100, 75, 64, 5), (300, 200, 64, 5), (40, 30, 64, 5), (73, 73, 64, 5), (64, 140, 64, 5), (400, 90, 64, 5),
         (700, 300, 64, 5), (341, 256, 256, 2)]


def input_image(i: int) -> Image.Image:
    """Input i: seeded uint8 RGB noise of CASES[i]'s size (the test makes the same one)."""
    w, h = CASES[i][:2]
    return Image.fromarray(np.random.default_rng(1000 + i).integers(0, 256, (h, w, 3), dtype=np.uint8))


def main() -> None:
    path = os.environ.get("FLEXVAR_OFFICIAL_DIR")
    if not path or not (Path(path) / "dataset" / "augmentation.py").is_file():
        sys.exit("make_augment_references: set FLEXVAR_OFFICIAL_DIR to a clone of jiaosiyu1999/FlexVAR")
    spec = importlib.util.spec_from_file_location("official_augmentation", Path(path) / "dataset" / "augmentation.py")
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)                      # official random_crop_arr / center_crop_arr

    refs: dict[str, np.ndarray] = {"cases": np.array(CASES)}
    for i, (_, _, size, seeds) in enumerate(CASES):
        img = input_image(i)
        refs[f"input_sha256_{i}"] = np.frombuffer(hashlib.sha256(np.asarray(img).tobytes()).digest(), dtype=np.uint8)
        refs[f"center_{i}"] = np.asarray(official.center_crop_arr(img, size))
        for s in range(seeds):
            random.seed(s)
            torch.manual_seed(s)
            flip = torch.rand(1).item() < 0.5               # what RandomHorizontalFlip() draws next ...
            torch.manual_seed(s)
            flipped = transforms.RandomHorizontalFlip()(img)   # ... and the official transform itself
            assert (np.asarray(flipped) == np.asarray(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))).all() == flip
            refs[f"crop_{i}_{s}"] = np.asarray(official.random_crop_arr(flipped, size))
            refs[f"flip_{i}_{s}"] = np.array(flip)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **refs)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB): {len(CASES)} images, {sum(c[3] for c in CASES)} crops")


if __name__ == "__main__":
    main()
