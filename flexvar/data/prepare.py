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

Streaming, at any size: each split is a lazy sequence of tasks (an index for builtin images, a
file path or encoded bytes otherwise); `data.num_workers` processes render or decode, clean and
PNG-encode them in order (multiprocessing imap), and the main process appends the results to an
Arrow file as they arrive, with a tqdm progress bar. No split is ever held in memory: only the
running content hash, label counts, the skip list and a few preview images.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from flexvar.config import DataConfig
from flexvar.data.synthetic import BUILTIN, render_one
from flexvar.errors import FlexvarError

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(FlexvarError, RuntimeError):
    """The source cannot be prepared (missing path, empty class, no valid image, bad image in fail mode)."""


@dataclass
class Source:
    """What to prepare: class names and, per split, (task count, lazy task iterator, the picklable
    function a worker applies to one task -> (name, label, png bytes or None, reason why not))."""
    class_names: list[str]
    splits: dict[str, tuple[int, Iterable[Any], Callable[[Any], tuple[str, int, bytes | None, str]]]]


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


# --------------------------------------------------------------------------- workers (one task each)
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _render_builtin(task: tuple[int, int], classes: list[str], resolution: int, seed: int, dataset: str
                    ) -> tuple[str, int, bytes | None, str]:
    """Builtin image `i` of `label`: its own seeded RNG stream, so any worker renders it identically."""
    i, label = task
    img = render_one(classes[label], resolution, np.random.default_rng([seed, i]), dataset)
    return f"builtin[{i}]", label, _png(img), ""


def _clean_file(task: tuple[str, bytes | str, int], resolution: int, upscale_small: bool
                ) -> tuple[str, int, bytes | None, str]:
    """Decode and clean one (name, bytes-or-path, label); a bad file gives its reason instead of bytes."""
    name, src, label = task
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        return name, label, _png(clean(img, resolution, upscale_small)), ""
    except Exception as e:  # PIL raises many types for bad files
        return name, label, None, (f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e))


# --------------------------------------------------------------------------- sources
def _builtin(name: str, cfg: DataConfig, seed: int) -> Source:
    if name not in BUILTIN:
        raise DataError(f"data.source: unknown builtin dataset {name!r}; available: {', '.join(BUILTIN)}")
    classes = BUILTIN[name]
    n_cls = len(classes)
    work = partial(_render_builtin, classes=classes, resolution=cfg.resolution, dataset=name)
    return Source(classes, {
        "train": (cfg.num_train, ((i, i % n_cls) for i in range(cfg.num_train)), partial(work, seed=seed)),
        "val": (cfg.num_val, ((i, i % n_cls) for i in range(cfg.num_val)), partial(work, seed=seed + 1_000_003))})


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


def _file_work(cfg: DataConfig):
    return partial(_clean_file, resolution=cfg.resolution, upscale_small=cfg.upscale_small)


def _imagefolder(path: str, cfg: DataConfig, seed: int, cache_dir: str) -> Source:
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
    tasks = {split: (len(d), ((r["image"]["path"] or f"{split}[{i}]", r["image"]["bytes"] or r["image"]["path"],
                               r["label"]) for i, r in enumerate(d)), _file_work(cfg)) for split, d in splits.items()}
    return Source(classes, tasks)


def _hf(spec: str, cfg: DataConfig, seed: int, cache_dir: str) -> Source:
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
    tasks = {split: (len(d), ((f"{ds_id}/{split}[{i}]", r[cfg.image_column]["bytes"] or r[cfg.image_column]["path"],
                               int(r[cfg.label_column])) for i, r in enumerate(d)), _file_work(cfg))
             for split, d in splits.items()}
    return Source(list(names), tasks)


def read_source(cfg: DataConfig, seed: int, cache_dir: str) -> Source:
    kind, _, rest = cfg.source.partition(":")
    if kind == "builtin":
        return _builtin(rest, cfg, seed)
    if kind == "imagefolder":
        return _imagefolder(rest, cfg, seed, cache_dir)
    return _hf(rest, cfg, seed, cache_dir)


# --------------------------------------------------------------------------- streaming the work
def run_tasks(work, tasks: Iterable[Any], num_workers: int, chunksize: int = 16) -> Iterator[Any]:
    """work(task) for every task, in order: in `num_workers` processes (0: here). Tasks are handed out
    in windows of a few chunks per worker, so neither pending tasks nor finished results pile up
    (Pool.imap alone would buffer results without bound when the consumer is slower)."""
    if num_workers == 0:
        yield from map(work, tasks)
        return
    tasks = iter(tasks)
    window = num_workers * chunksize * 4
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        while batch := list(itertools.islice(tasks, window)):
            yield from pool.imap(work, batch, chunksize=chunksize)


PREVIEW_CLASSES = 16   # the preview shows at most this many classes (ImageNet has 1,000)
PREVIEW_PER_CLASS = 8


@dataclass
class _Tally:
    """What prepare keeps while streaming: O(classes + skipped), never O(images)."""
    hash: Any
    counts: dict[str, Counter] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    preview: dict[int, list[bytes]] = field(default_factory=dict)


def _write_split(source: Source, split: str, cfg: DataConfig, num_workers: int, features, arrow_path: Path,
                 tally: _Tally) -> int:
    """Stream one split's cleaned images into an Arrow file; returns how many were kept."""
    from datasets.arrow_writer import ArrowWriter

    total, tasks, work = source.splits[split]
    counts = tally.counts.setdefault(split, Counter())
    tally.hash.update(split.encode())
    with ArrowWriter(features=features, path=str(arrow_path), writer_batch_size=1000) as writer:
        for name, label, png, reason in tqdm(run_tasks(work, tasks, num_workers), total=total,
                                             desc=f"prepare {split}", unit="img", mininterval=5):
            if png is None:
                if cfg.on_bad_image == "fail":
                    raise DataError(f"bad image {name}: {reason} (data.on_bad_image is 'fail'; set it to 'skip' "
                                    f"to skip such files)")
                log.warning("skipping %s: %s", name, reason)
                tally.skipped.append({"split": split, "file": name, "reason": reason})
                continue
            pixels = np.asarray(Image.open(io.BytesIO(png)), dtype=np.uint8)
            tally.hash.update(pixels.tobytes())
            tally.hash.update(int(label).to_bytes(8, "little"))
            writer.write({"image": {"bytes": png, "path": None}, "label": label})
            counts[label] += 1
            shown = tally.preview.setdefault(label, []) if split == "train" and label < PREVIEW_CLASSES else None
            if shown is not None and len(shown) < PREVIEW_PER_CLASS:
                shown.append(png)
        writer.finalize()
    kept = sum(counts.values())
    if kept == 0:
        raise DataError(f"no valid images in the {split} split of {cfg.source} "
                        f"({len(tally.skipped)} skipped; see the log)")
    return kept


def preview_grid(preview: dict[int, list[bytes]], class_names: list[str]):
    """A per-class grid of the first train images (first PREVIEW_CLASSES classes): the data at a glance."""
    import torch

    from flexvar.data.splits import decode_png_NCHW
    from flexvar.grid import class_grid

    labels = [c for c in sorted(preview) for _ in preview[c]]
    images_NCHW = decode_png_NCHW([b for c in sorted(preview) for b in preview[c]])
    return class_grid(images_NCHW, torch.tensor(labels), class_names[:PREVIEW_CLASSES], PREVIEW_PER_CLASS)


def prepare(cfg: DataConfig, seed: int, out_dir: str | os.PathLike) -> dict:
    """Read `cfg.source`, clean every image (in `cfg.num_workers` processes), stream the prepared
    dataset to a temp folder and rename it into place; return stats."""
    import datasets

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        with tempfile.TemporaryDirectory(prefix="flexvar-hf-cache-") as cache_dir:
            source = read_source(cfg, seed, cache_dir)
            features = datasets.Features({"image": datasets.Image(),
                                          "label": datasets.ClassLabel(names=source.class_names)})
            tally = _Tally(hashlib.sha256(json.dumps(source.class_names).encode()))
            for split in sorted(source.splits):          # sorted: the content hash's order
                _write_split(source, split, cfg, cfg.num_workers, features, Path(cache_dir) / f"{split}.arrow", tally)
            digest = tally.hash.hexdigest()
            dd = {}
            for split in source.splits:
                ds = datasets.Dataset.from_file(str(Path(cache_dir) / f"{split}.arrow"))
                ds._fingerprint = hashlib.sha256(f"{digest}:{split}".encode()).hexdigest()[:16]  # stable, not random
                dd[split] = ds
            datasets.DatasetDict(dd).save_to_disk(str(tmp), num_proc=None)
            del dd
        stats = {
            "source": cfg.source, "resolution": cfg.resolution, "classes": source.class_names,
            "counts": {split: {source.class_names[c]: n for c, n in sorted(tally.counts[split].items())}
                       for split in source.splits},
            "totals": {split: sum(tally.counts[split].values()) for split in source.splits},
            "skipped": tally.skipped, "num_skipped": len(tally.skipped), "content_hash": digest,
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        preview_grid(tally.preview, source.class_names).save(tmp / "preview.png")
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats
