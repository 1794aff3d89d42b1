"""Turn a data source into the prepared dataset every later stage reads.

Sources (`data.source`):
  builtin:<name>        generated here from the seed (flexvar/data/synthetic.py), no download
  hf:<id>[:<config>]    `datasets.load_dataset` (needs network, or a local dataset folder as id)
  imagefolder:<path>    `<path>/train/<class>/*.png|jpg|...`, optional `<path>/val/...`,
                        read with the `datasets` imagefolder builder

Output: `datasets.DatasetDict.save_to_disk` with `train`/`val` splits (columns `image` as PNG,
`label` as ClassLabel), RGB, shorter side resized then centre-cropped to `data.resolution`,
plus `stats.json` (counts per class and split, skipped files and why, content hash).
The output appears only when everything succeeded (written to a temp folder, then renamed).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from flexvar.config import DataConfig
from flexvar.data.synthetic import BUILTIN, render_shapes
from flexvar.errors import FlexvarError

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(FlexvarError, RuntimeError):
    """The source cannot be prepared (missing path, empty class, no valid image, bad image in fail mode)."""


@dataclass
class Prepared:
    """Cleaned images (PIL RGB at the target resolution) and labels per split."""
    class_names: list[str]
    splits: dict[str, tuple[list[Image.Image], list[int]]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- image cleaning
def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, P, RGBA, CMYK, I;16, ...) -> 8-bit RGB; alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / scale * 255.0).round().clip(0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    return img.convert("RGB")


def resize_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic), then centre-crop a square."""
    return ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def clean(img: Image.Image, resolution: int, upscale_small: bool) -> Image.Image:
    """Decode fully, convert to RGB, check the size and resize/crop; raises ValueError with the reason."""
    img.load()  # truncated files fail here, not later
    if min(img.size) < resolution and not upscale_small:
        raise ValueError(f"smaller than the target ({img.size[0]}x{img.size[1]} < {resolution}); "
                         f"set data.upscale_small: true to upscale such images")
    return resize_crop(to_rgb(img), resolution)


# --------------------------------------------------------------------------- sources
def _builtin(name: str, cfg: DataConfig, seed: int) -> Prepared:
    if name not in BUILTIN:
        raise DataError(f"data.source: unknown builtin dataset {name!r}; available: {', '.join(BUILTIN)}")
    classes = BUILTIN[name]
    train = render_shapes(cfg.num_train, cfg.resolution, seed, classes)
    val = render_shapes(cfg.num_val, cfg.resolution, seed + 1_000_003, classes)
    return Prepared(classes, {"train": train, "val": val})


def _clean_all(items: Iterable[tuple[str, Image.Image | bytes | str, int]], total: int, cfg: DataConfig,
               split: str, skipped: list[dict[str, str]]) -> tuple[list[Image.Image], list[int]]:
    """Decode and clean (name, image-or-bytes-or-path, label) items; skip or fail on bad ones."""
    images, labels = [], []
    for name, src, label in tqdm(items, total=total, desc=f"prepare {split}", unit="img"):
        try:
            img = src if isinstance(src, Image.Image) else Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
            images.append(clean(img, cfg.resolution, cfg.upscale_small))
            labels.append(label)
        except Exception as e:  # PIL raises many types for bad files
            reason = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            if cfg.on_bad_image == "fail":
                raise DataError(f"bad image {name}: {reason} (data.on_bad_image is 'fail'; set it to 'skip' "
                                f"to skip such files)") from None
            log.warning("skipping %s: %s", name, reason)
            skipped.append({"split": split, "file": name, "reason": reason})
    return images, labels


def _check_imagefolder(root: Path) -> list[str]:
    """Fail early on a missing tree or an empty class folder; return the class names."""
    if not root.is_dir():
        raise DataError(f"data.source: imagefolder path {root} does not exist")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"data.source: {root} has no train/ folder (expected {root}/train/<class>/*.png)")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"data.source: {train} has no class folders")
    for c in classes:
        if not any(f.is_file() and f.suffix.lower() in IMAGE_EXTS for f in (train / c).rglob("*")):
            raise DataError(f"data.source: class folder {train / c} contains no image files")
    return classes


def _split_off_val(ds, fraction: float, seed: int, stratify: str):
    """Seeded train/val split of a source without a val split; stratified by class when possible."""
    try:
        parts = ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    except ValueError:  # too few images per class to stratify, or a non-ClassLabel column
        parts = ds.train_test_split(test_size=fraction, seed=seed)
    return {"train": parts["train"], "val": parts["test"]}


def _imagefolder(path: str, cfg: DataConfig, seed: int, cache_dir: str) -> Prepared:
    import datasets

    root = Path(path).expanduser()
    classes = _check_imagefolder(root)
    ds = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir)
    ds = ds.cast_column("image", datasets.Image(decode=False))
    names = ds["train"].features["label"].names
    if names != classes:
        raise DataError(f"data.source: class folders {classes} differ from what datasets found {names}")
    val_key = next((k for k in ("validation", "val", "test") if k in ds), None)
    splits = {"train": ds["train"]}
    if val_key:
        splits["val"] = ds[val_key]
    else:
        splits = _split_off_val(ds["train"], cfg.val_fraction, seed, stratify="label")
    out = Prepared(classes)
    for split, d in splits.items():
        items = ((r["image"]["path"] or f"{split}[{i}]", r["image"]["bytes"] or r["image"]["path"], r["label"])
                 for i, r in enumerate(d))
        out.splits[split] = _clean_all(items, len(d), cfg, split, out.skipped)
    return out


def _hf(spec: str, cfg: DataConfig, seed: int, cache_dir: str) -> Prepared:
    import datasets

    ds_id, _, config = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    ds = datasets.load_dataset(ds_id, config or None, cache_dir=cache_dir)
    for col in (cfg.image_column, cfg.label_column):
        if col not in ds[cfg.hf_split_train].column_names:
            raise DataError(f"data.image_column/label_column: column {col!r} not in {ds_id} "
                            f"(columns: {ds[cfg.hf_split_train].column_names})")
    ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    feat = ds[cfg.hf_split_train].features[cfg.label_column]
    splits = {"train": ds[cfg.hf_split_train]}
    if cfg.hf_split_val in ds:
        splits["val"] = ds[cfg.hf_split_val]
    else:
        splits = _split_off_val(ds[cfg.hf_split_train], cfg.val_fraction, seed, stratify=cfg.label_column)
    names = getattr(feat, "names", None) or [str(i) for i in range(max(max(s[cfg.label_column]) for s in splits.values()) + 1)]
    out = Prepared(list(names))
    for split, d in splits.items():
        items = ((f"{ds_id}/{split}[{i}]", r[cfg.image_column]["bytes"] or r[cfg.image_column]["path"],
                  int(r[cfg.label_column])) for i, r in enumerate(d))
        out.splits[split] = _clean_all(items, len(d), cfg, split, out.skipped)
    return out


def read_source(cfg: DataConfig, seed: int, cache_dir: str) -> Prepared:
    kind, _, rest = cfg.source.partition(":")
    if kind == "builtin":
        return _builtin(rest, cfg, seed)
    if kind == "imagefolder":
        return _imagefolder(rest, cfg, seed, cache_dir)
    return _hf(rest, cfg, seed, cache_dir)


# --------------------------------------------------------------------------- writing
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _rows(images: list[Image.Image], labels: list[int]) -> Iterator[tuple[bytes, int]]:
    for img, label in zip(images, labels):
        yield _png(img), label


def content_hash(prepared: Prepared) -> str:
    """sha256 over class names, then every split's pixels and labels in order."""
    h = hashlib.sha256(json.dumps(prepared.class_names).encode())
    for split in sorted(prepared.splits):
        images, labels = prepared.splits[split]
        h.update(split.encode())
        for img, label in zip(images, labels):
            h.update(np.asarray(img, dtype=np.uint8).tobytes())
            h.update(int(label).to_bytes(8, "little"))
    return h.hexdigest()


def preview_grid(images: list[Image.Image], labels: list[int], class_names: list[str], per_class: int = 8):
    """A per-class grid of the first train images: what the dataset looks like, at a glance."""
    import torch

    from flexvar.grid import class_grid

    first = [i for c in range(len(class_names)) for i in [j for j, lab in enumerate(labels) if lab == c][:per_class]]
    images_NCHW = torch.from_numpy(np.stack([np.asarray(images[i]) for i in first])).permute(0, 3, 1, 2)
    return class_grid(images_NCHW, torch.tensor([labels[i] for i in first]), class_names, per_class)


def write_prepared(prepared: Prepared, out_dir: Path, cfg: DataConfig) -> dict:
    """save_to_disk train/val + stats.json, atomically (temp folder renamed into place)."""
    import datasets

    for split, (images, _) in prepared.splits.items():
        if not images:
            raise DataError(f"no valid images in the {split} split of {cfg.source} "
                            f"({len(prepared.skipped)} skipped; see the log)")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=prepared.class_names)})
    digest = content_hash(prepared)
    dd = {}
    for split, (images, labels) in prepared.splits.items():
        data = {"image": [{"bytes": b, "path": None} for b, _ in _rows(images, labels)], "label": labels}
        ds = datasets.Dataset.from_dict(data, features=features)
        ds._fingerprint = hashlib.sha256(f"{digest}:{split}".encode()).hexdigest()[:16]  # stable, not random
        dd[split] = ds
    stats = {
        "source": cfg.source, "resolution": cfg.resolution, "classes": prepared.class_names,
        "counts": {split: {prepared.class_names[c]: n for c, n in sorted(Counter(labels).items())}
                   for split, (_, labels) in prepared.splits.items()},
        "totals": {split: len(labels) for split, (_, labels) in prepared.splits.items()},
        "skipped": prepared.skipped, "num_skipped": len(prepared.skipped), "content_hash": digest,
    }
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        datasets.DatasetDict(dd).save_to_disk(str(tmp), num_proc=None)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        train_images, train_labels = prepared.splits["train"]
        preview_grid(train_images, train_labels, prepared.class_names).save(tmp / "preview.png")
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def prepare(cfg: DataConfig, seed: int, out_dir: str | os.PathLike) -> dict:
    """Read `cfg.source`, clean every image, write the prepared dataset; return stats."""
    with tempfile.TemporaryDirectory(prefix="flexvar-hf-cache-") as cache_dir:
        prepared = read_source(cfg, seed, cache_dir)
        return write_prepared(prepared, Path(out_dir), cfg)
