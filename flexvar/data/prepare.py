"""Turn a data source into the prepared dataset every later stage reads.

Sources (`data.source`):
  builtin:<name>        generated here from the seed (flexvar/data/synthetic.py), no download
  hf:<id>[:<config>]    `datasets.load_dataset` (needs network, or a local dataset folder as id)
  imagefolder:<path>    `<path>/train/<class>/*.png|jpg|...`, optional `<path>/val/...`,
                        read with the `datasets` imagefolder builder

Output: the layout of `datasets.DatasetDict.save_to_disk` with `train`/`val` splits (columns `image`
as PNG, `label` as ClassLabel), RGB, with the official (ADM) geometry of flexvar/data/augment.py:
`data.augment: center` stores the centre crop at `data.resolution` (short side resized, up for small
images when `data.upscale_small`), `official` stores the whole image with its short side at
ceil(resolution / 0.88), the pixels every official random crop is drawn from; plus `stats.json`
(counts per class and split, skipped files and why, content hash) and `preview.png`.
Everything, the Arrow data and the source's `datasets` cache included, is written into one temp
folder beside the output (`.<out>.tmp*` in its parent: the same file system; the system temp folder
holds only the worker pool's socket) and renamed into place when everything succeeded; on failure the temp folder is removed.

Streaming, at any size: each split is a lazy sequence of tasks (an index for builtin images, a
file path or encoded bytes otherwise); `data.num_workers` processes (from a forkserver) render or
decode, clean and PNG-encode them in order, and the main process appends the results to the
split's Arrow file as they arrive, with a tqdm progress bar. No split is ever held in memory: only the
running content hash, label counts, the skip list and a few preview images. The content hash is
built from each image's pixel digest, computed by the worker that decoded it (the main process
never decodes an image a second time).
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
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from flexvar.config import DataConfig
from flexvar.data.augment import center_crop, resize_short, stored_short_side
from flexvar.data.synthetic import BUILTIN, render_one
from flexvar.errors import FlexvarError

log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(FlexvarError, RuntimeError):
    """The source cannot be prepared (missing path, empty class, no valid image, bad image in fail mode)."""


@dataclass
class Source:
    """What to prepare: class names and, per split, (task count, lazy task iterator, the picklable
    function a worker applies to one task -> Result)."""
    class_names: list[str]
    splits: dict[str, tuple[int, Iterable[Any], Callable[[Any], "Result"]]]


# (name, label, png bytes or None, reason why not (kept: "" or RESIZED_UP), sha256 of the cleaned image's size and pixels)
Result = tuple[str, int, bytes | None, str, bytes]


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


def clean(img: Image.Image, resolution: int, upscale_small: bool, augment: str = "center") -> Image.Image:
    """Decode fully, convert to RGB, check the size, then the official geometry: the centre crop at
    `resolution` (augment center) or the short side at the size random crops are drawn from (official);
    raises ValueError with the reason."""
    img.load()  # truncated files fail here, not later
    if min(img.size) < resolution and not upscale_small:
        raise ValueError(f"smaller than the target ({img.size[0]}x{img.size[1]} < {resolution}); "
                         f"set data.upscale_small: true to resize such images up (as the official code does)")
    img = to_rgb(img)
    if augment == "official":
        return resize_short(img, stored_short_side(resolution, augment))
    return center_crop(img, resolution)


# --------------------------------------------------------------------------- workers (one task each)
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def pixel_digest(img: Image.Image) -> bytes:
    """sha256 of an RGB image's size and pixels: what the content hash is made of (PNG-encoder independent)."""
    pixels = np.asarray(img, dtype=np.uint8)
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).digest()


RESIZED_UP = "resized up"   # a kept image whose short side was below data.resolution


def _encoded(name: str, label: int, img: Image.Image, note: str = "") -> Result:
    return name, label, _png(img), note, pixel_digest(img)


def _render_builtin(task: tuple[int, int], classes: list[str], resolution: int, seed: int, dataset: str) -> Result:
    """Builtin image `i` of `label`: its own seeded RNG stream, so any worker renders it identically."""
    i, label = task
    return _encoded(f"builtin[{i}]", label, render_one(classes[label], resolution, np.random.default_rng([seed, i]),
                                                       dataset))


def _clean_file(task: tuple[str, bytes | str, int], resolution: int, upscale_small: bool, augment: str) -> Result:
    """Decode and clean one (name, bytes-or-path, label); a bad file gives its reason instead of bytes."""
    name, src, label = task
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        small = min(img.size) < resolution
        return _encoded(name, label, clean(img, resolution, upscale_small, augment), RESIZED_UP if small else "")
    except Exception as e:  # PIL raises many types for bad files
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
        if isinstance(src, str):   # PIL's message names the file by the absolute path datasets gave it
            reason = reason.replace(src, name)
        return name, label, None, reason, b""


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
    return partial(_clean_file, resolution=cfg.resolution, upscale_small=cfg.upscale_small, augment=cfg.augment)


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
    name = partial(_source_name, path=path, bases=tuple({os.path.abspath(root), os.path.realpath(root)}))
    tasks = {split: (len(d), ((name(r["image"]["path"]) if r["image"]["path"] else f"{split}[{i}]",
                               r["image"]["bytes"] or r["image"]["path"], r["label"]) for i, r in enumerate(d)),
                     _file_work(cfg)) for split, d in splits.items()}
    return Source(classes, tasks)


def _source_name(file: str, path: str, bases: tuple[str, ...]) -> str:
    """A file of an imagefolder source as `data.source` names its folder (`path/train/<class>/<file>`), not
    the absolute path datasets gives it: stats.json stays the same in a checkout at another path."""
    for base in bases:
        if file.startswith(base + os.sep):
            return (Path(path) / file[len(base) + 1:]).as_posix()
    return file


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
    in windows of a few chunks per worker, so neither pending tasks nor finished results pile up.

    The workers come from a forkserver, a clean single-threaded process, not forked from the caller:
    a caller with threads (Prefect's event loop, Ray's, a DataLoader's) may hold a lock at the moment
    of a fork, the child inherits it held and hangs, and so does the pool's shutdown waiting for it.
    A worker that dies (it could not start, or was killed) stops the run with an error, never a hang."""
    if num_workers == 0:
        yield from map(work, tasks)
        return
    tasks = iter(tasks)
    window = num_workers * chunksize * 4
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])    # the server imports this module once; each worker is a fork of it
    try:
        with ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
            while batch := list(itertools.islice(tasks, window)):
                yield from pool.map(work, batch, chunksize=chunksize)
    except BrokenProcessPool as e:
        raise DataError(f"a prepare worker process died: {e} Its own error, if any, is printed above; "
                        f"data.num_workers: 0 prepares in the stage's process") from e


PREVIEW_CLASSES = 16   # the preview shows at most this many classes (ImageNet has 1,000)
PREVIEW_PER_CLASS = 8


@dataclass
class _Tally:
    """What prepare keeps while streaming: O(classes + skipped), never O(images)."""
    hash: Any
    counts: dict[str, Counter] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    preview: dict[int, list[bytes]] = field(default_factory=dict)
    resized_up: dict[str, int] = field(default_factory=dict)


def _write_split(source: Source, split: str, cfg: DataConfig, num_workers: int, features, arrow_path: Path,
                 tally: _Tally) -> int:
    """Stream one split's cleaned images into an Arrow file; returns how many were kept."""
    from datasets.arrow_writer import ArrowWriter

    total, tasks, work = source.splits[split]
    counts = tally.counts.setdefault(split, Counter())
    tally.hash.update(split.encode())
    # 100 rows per Arrow record batch (datasets' own size for images): the rows waiting in the writer stay
    # a few tens of MB at 291 px, and the file is what save_to_disk wrote (the same record batches)
    with ArrowWriter(features=features, path=str(arrow_path), writer_batch_size=100) as writer:
        for name, label, png, reason, digest in tqdm(run_tasks(work, tasks, num_workers), total=total,
                                                     desc=f"prepare {split}", unit="img", mininterval=5):
            if png is None:
                if cfg.on_bad_image == "fail":
                    raise DataError(f"bad image {name}: {reason} (data.on_bad_image is 'fail'; set it to 'skip' "
                                    f"to skip such files)")
                log.warning("skipping %s: %s", name, reason)
                tally.skipped.append({"split": split, "file": name, "reason": reason})
                continue
            tally.resized_up[split] = tally.resized_up.get(split, 0) + (reason == RESIZED_UP)
            tally.hash.update(digest)            # the worker's digest of the pixels: no second decode here
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


def preview_grid(preview: dict[int, list[bytes]], class_names: list[str], resolution: int):
    """A per-class grid of the first train images (first PREVIEW_CLASSES classes, centre crops at
    `resolution`): the data at a glance."""
    import torch

    from flexvar.data.splits import decode_png_NCHW
    from flexvar.grid import class_grid

    labels = [c for c in sorted(preview) for _ in preview[c]]
    images_NCHW = decode_png_NCHW([b for c in sorted(preview) for b in preview[c]], size=resolution)
    return class_grid(images_NCHW, torch.tensor(labels), class_names[:PREVIEW_CLASSES], PREVIEW_PER_CLASS)


def _write_split_info(split_dir: Path, features, fingerprint: str) -> None:
    """The state.json and dataset_info.json that `Dataset.save_to_disk` writes beside its Arrow file,
    for the Arrow file `_write_split` streamed into place (so no 147 GB copy is ever made)."""
    import datasets
    from datasets.utils.py_utils import asdict

    state = {"_data_files": [{"filename": ARROW_FILE}], "_fingerprint": fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (split_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(datasets.DatasetInfo(features=features))   # datasets' own asdict, as save_to_disk
    (split_dir / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))


ARROW_FILE = "data-00000-of-00001.arrow"


def prepare(cfg: DataConfig, seed: int, out_dir: str | os.PathLike) -> dict:
    """Read `cfg.source`, clean every image (in `cfg.num_workers` processes), stream each split's Arrow
    file into a temp folder beside `out_dir` and rename it into place; return stats."""
    import datasets

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp"))
    try:
        cache_dir = tmp / ".source-cache"       # the `datasets` cache of an hf/imagefolder source: beside, not /tmp
        source = read_source(cfg, seed, str(cache_dir))
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=source.class_names)})
        tally = _Tally(hashlib.sha256(json.dumps(source.class_names).encode()))
        for split in sorted(source.splits):          # sorted: the content hash's order
            (tmp / split).mkdir()
            _write_split(source, split, cfg, cfg.num_workers, features, tmp / split / ARROW_FILE, tally)
        digest = tally.hash.hexdigest()
        for split in source.splits:
            _write_split_info(tmp / split, features, hashlib.sha256(f"{digest}:{split}".encode()).hexdigest()[:16])
        (tmp / "dataset_dict.json").write_text(json.dumps({"splits": list(source.splits)}))
        names, splits = source.class_names, list(source.splits)
        del source                                # its datasets objects map files of the cache removed next
        shutil.rmtree(cache_dir, ignore_errors=True)
        stats = {
            "source": cfg.source, "resolution": cfg.resolution, "augment": cfg.augment,
            "stored_short_side": stored_short_side(cfg.resolution, cfg.augment), "classes": names,
            "counts": {split: {names[c]: n for c, n in sorted(tally.counts[split].items())} for split in splits},
            "totals": {split: sum(tally.counts[split].values()) for split in splits},
            "skipped": tally.skipped, "num_skipped": len(tally.skipped), "resized_up": tally.resized_up,
            "content_hash": digest,
        }
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        preview_grid(tally.preview, names, cfg.resolution).save(tmp / "preview.png")
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats
