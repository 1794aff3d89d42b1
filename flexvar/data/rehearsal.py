"""A generated ImageNet-layout folder: the paper workload's data shape without ImageNet.

    python -m flexvar.data.rehearsal data/rehearsal [--classes 1000] [--train-per-class 3] [--val-per-class 1]

writes <root>/{train,val}/<wnid>/*.JPEG like ILSVRC-2012 (wnid-like class folders n0xxxxxxx,
`<wnid>_<i>.JPEG` in train, `ILSVRC2012_val_<n>.JPEG` in val): seeded class-dependent pictures
(a hue, stripes of a class-dependent angle and frequency, a disc, noise) as JPEGs of mixed sizes
and aspects. A fraction `small_fraction` has a short side below `resolution` (ImageNet has ~3% below
256 px), and `corrupt` files are broken (truncated JPEGs and a text file named .JPEG), spread over
train and val: what `prepare` must resize up and skip with a count (`presets/rehearsal.yaml`).
Memory: one image at a time.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from flexvar.errors import command, usage


def wnid(k: int) -> str:
    """A WordNet-id-like class folder name, distinct and sorted in k (n01440764 style)."""
    return f"n{1_000_000 + 7919 * k:08d}"


def picture(label: int, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """A class-dependent RGB picture: hue and stripe angle/frequency from the class, position and noise random."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / max(w, h)
    angle, freq = np.pi * ((label * 0.618034) % 1.0), 4 + (label % 13)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 6.3))
    hue = np.array([np.sin(label * 0.9), np.sin(label * 1.7 + 2), np.sin(label * 2.3 + 4)]) * 0.5 + 0.5
    img = stripes[..., None] * hue + (1 - stripes[..., None]) * (1 - hue)
    cy, cx, r = rng.uniform(0.2, 0.8) * h / max(w, h), rng.uniform(0.2, 0.8) * w / max(w, h), rng.uniform(0.1, 0.3)
    img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = hue[::-1]
    img = img + rng.normal(0, 0.04, img.shape)
    return Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8))


def image_size(rng: np.random.Generator, resolution: int, small: bool) -> tuple[int, int]:
    """(w, h): short side in [resolution/4, resolution) when small, else [resolution, 2 resolution);
    aspect (long / short) mostly ImageNet's 1-1.5, sometimes up to 3; landscape or portrait."""
    short = int(rng.integers(max(8, resolution // 4), resolution)) if small else int(rng.integers(resolution, 2 * resolution))
    aspect = rng.uniform(1.0, 1.5) if rng.random() < 0.9 else rng.uniform(1.5, 3.0)
    long = int(round(short * aspect))
    return (long, short) if rng.random() < 0.7 else (short, long)


def make_imagenet_like(root: str | Path, classes: int = 1000, train_per_class: int = 3, val_per_class: int = 1,
                       resolution: int = 256, small_fraction: float = 0.1, corrupt: int = 4, seed: int = 0,
                       quality: int = 90) -> dict:
    """Write the folder (refuses an existing non-empty root); returns counts and the small/corrupt file lists."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty; give a new folder")
    rng = np.random.default_rng(seed)
    files = [("train", k, root / "train" / wnid(k) / f"{wnid(k)}_{i}.JPEG")
             for k in range(classes) for i in range(train_per_class)]
    files += [("val", k, root / "val" / wnid(k) / f"ILSVRC2012_val_{k * val_per_class + i + 1:08d}.JPEG")
              for k in range(classes) for i in range(val_per_class)]
    n_small = int(round(small_fraction * len(files)))
    small = set(rng.choice(len(files), n_small, replace=False).tolist())
    # corrupt files: half in val when val has room, spread evenly, never the only image of a class folder
    spare = {split: [j for j, (sp, _, _) in enumerate(files) if sp == split and j not in small]
             for split, per_class in (("train", train_per_class), ("val", val_per_class)) if per_class > 1}
    n_val = min(corrupt // 2, len(spare.get("val", [])))
    broken = set()
    for split, n in (("val", n_val), ("train", corrupt - n_val)):
        if n:
            broken |= set(spare.get(split, [])[:: max(1, len(spare.get(split, [])) // n)][:n])
    if len(broken) < corrupt:
        raise usage("--corrupt", f"{corrupt} corrupt files need classes with more than one image "
                                 f"(only {sum(map(len, spare.values()))} such files); raise --train-per-class")
    out = {"train": 0, "val": 0, "small": [], "corrupt": []}
    for j, (split, label, path) in enumerate(files):
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = image_size(rng, resolution, j in small)
        buf = io.BytesIO()
        picture(label, w, h, rng).save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
        if j in broken:
            data = data[: len(data) // 3] if len(out["corrupt"]) % 2 == 0 else b"not a JPEG: a planted corrupt file\n"
            out["corrupt"].append(str(path))
        elif j in small:
            out["small"].append(str(path))
        path.write_bytes(data)
        out[split] += 1
    return out


@command("rehearsal-data")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--train-per-class", type=int, default=3)
    p.add_argument("--val-per-class", type=int, default=1)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--small-fraction", type=float, default=0.1)
    p.add_argument("--corrupt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = make_imagenet_like(a.root, a.classes, a.train_per_class, a.val_per_class, a.resolution, a.small_fraction,
                             a.corrupt, a.seed)
    print(f"rehearsal data: {a.root}: train={out['train']} val={out['val']} small={len(out['small'])} "
          f"corrupt={len(out['corrupt'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
