"""A prepared split (train or val) as the training and evaluation stages read it.

Two paths, chosen automatically by size (`data.in_memory_mb`):
- small splits (the embedded default: 3,000 images of 64 px = 37 MB) are decoded once into one
  uint8 tensor: on 2 cores that beats decoding every batch;
- larger splits are never stacked: the Arrow files written by `prepare` stay on disk, each batch is
  read through a memory map and PNG-decoded on demand, in DataLoader worker processes
  (`data.num_workers`), and the map's pages are released after every read (ArrowImages), so memory
  is bounded by the batch, not the dataset.
Both give the same pixels for the same indices (tested), so the path never changes results.

Item keys for flipped views: `SplitImages(split, flips=True)` reads key k as image k // 2,
horizontally flipped when k is odd (the latent cache's (image, flip) convention).
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from flexvar.errors import FlexvarError

DEFAULT_IN_MEMORY_MB = 256


class SplitError(FlexvarError, ValueError):
    """A prepared split that does not read as `prepare` wrote it; the message says to rerun prepare."""


def to_unit_range(images_NCHW: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the tokenizer's input range."""
    return images_NCHW.float().div(127.5).sub(1.0)


def to_uint8(x_NCHW: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return x_NCHW.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def decode_png_NCHW(blobs: Sequence[bytes], hw: tuple[int, int] | None = None, size: int | None = None
                    ) -> torch.Tensor:
    """Encoded images -> uint8 (B, 3, H, W); with `size`, images stored larger (data.augment: official)
    are read as their centre crop at size x size (flexvar/data/augment.py)."""
    from PIL import Image

    from flexvar.data.augment import center_crop

    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    arrs = [np.asarray(center_crop(im, size) if size and im.size != (size, size) else im) for im in imgs]
    if not arrs:
        return torch.zeros(0, 3, *(hw or (1, 1)), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


class ArrowImages:
    """The encoded images of a prepared split, read straight from its Arrow files through this
    process's own read-only memory maps, whose pages are dropped from the process after every read
    (madvise MADV_DONTNEED). The pages stay in the kernel's page cache, shared by all readers, but a
    DataLoader worker reading a whole epoch no longer accumulates the file in its RSS, as it would
    through a table mapped by `datasets` (ImageNet at 256 px: a 147 GB file). Pickles as paths; each
    process maps the files when it first reads."""

    def __init__(self, paths: Sequence[str | os.PathLike], num_rows: int):
        self.paths, self.num_rows = [str(p) for p in paths], num_rows
        self._maps: list[mmap.mmap] | None = None
        self._chunks, self._starts = [], np.zeros(1, dtype=np.int64)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None, "_chunks": [], "_starts": np.zeros(1, dtype=np.int64)}

    def _open(self) -> None:
        import pyarrow as pa

        maps, chunks = [], []
        for path in self.paths:
            with open(path, "rb") as f:
                maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            chunks += [c.field("bytes") for c in pa.ipc.open_stream(pa.py_buffer(maps[-1])).read_all()
                       .column("image").chunks]                     # zero-copy views into the maps
        starts = np.cumsum([0] + [len(c) for c in chunks])
        if starts[-1] != self.num_rows:
            raise SplitError(f"{self.paths[0]}: {starts[-1]} images in the Arrow files, {self.num_rows} expected; "
                            f"rerun the prepare stage")
        self._maps, self._chunks, self._starts = maps, chunks, starts

    def take(self, idx: Sequence[int]) -> list[bytes]:
        """The encoded bytes of rows `idx` (copied out of the maps, whose pages are then released)."""
        if self._maps is None:
            self._open()
        chunk_B = np.searchsorted(self._starts, np.asarray(idx, dtype=np.int64), side="right") - 1
        # item by item: Arrow's take on a chunked binary column would first concatenate every chunk
        blobs = [self._chunks[k][int(i) - int(self._starts[k])].as_py() for k, i in zip(chunk_B.tolist(), idx)]
        for m in self._maps:
            if hasattr(mmap, "MADV_DONTNEED"):
                m.madvise(mmap.MADV_DONTNEED)
        return blobs


class ImageSplit:
    """Labels and class names in memory; images either in memory (`images_NCHW`) or on disk (`arrow`,
    an ArrowImages).

    `take(idx)` returns the images of any indices on either path; `images_NCHW` exists only on
    the in-memory path (a large split raises instead of silently stacking itself)."""

    def __init__(self, images_NCHW: torch.Tensor | None, labels_N: torch.Tensor, class_names: list[str],
                 arrow=None, fingerprint: str | None = None, size: int | None = None):
        if (images_NCHW is None) == (arrow is None):
            raise ValueError("ImageSplit needs exactly one of images_NCHW (in memory) or arrow (on disk)")
        self._images_NCHW, self.arrow = images_NCHW, arrow
        self.labels_N, self.class_names = labels_N, list(class_names)
        self._fingerprint = fingerprint
        self.size = size      # on disk: stored images not size x size are read as their centre crop

    def __len__(self) -> int:
        return len(self.labels_N)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_memory(self) -> bool:
        return self._images_NCHW is not None

    @property
    def images_NCHW(self) -> torch.Tensor:
        if self._images_NCHW is None:
            raise RuntimeError("this split is streamed from disk (larger than data.in_memory_mb); read it with "
                               "take() or a loader, never as one tensor")
        return self._images_NCHW

    @property
    def image_hw(self) -> tuple[int, int]:
        return tuple(self.take(torch.zeros(1, dtype=torch.long)).shape[-2:]) if len(self) else (0, 0)

    def take(self, idx: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """uint8 (B, 3, H, W) images at `idx` (any order, repeats allowed)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.in_memory:
            return self._images_NCHW[idx]
        return decode_png_NCHW(self.arrow.take(idx.tolist()), size=self.size)

    def fingerprint(self) -> str:
        """Short identity of the images and labels (a checkpoint never resumes on other data)."""
        if self._fingerprint is None:
            h = hashlib.sha1(self.labels_N.numpy().tobytes())
            h.update(self._images_NCHW.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def loader(self, batch_sampler: Sampler, num_workers: int = 0, flips: bool = False) -> DataLoader:
        """DataLoader of (uint8 images (B, 3, H, W), labels (B,)) batches; on-disk splits decode in
        `num_workers` worker processes, in-memory ones in this process (nothing to decode)."""
        workers = 0 if self.in_memory else num_workers
        return DataLoader(SplitImages(self, flips), batch_sampler=batch_sampler, num_workers=workers,
                          collate_fn=_as_is, prefetch_factor=2 if workers else None,
                          generator=torch.Generator().manual_seed(0))   # never draws from the global RNG


def _as_is(batch):
    return batch


class SplitImages(Dataset):
    """The split as a map-style Dataset: key -> (uint8 (3, H, W), label); batched reads via __getitems__.

    flips=True: keys 0 .. 2N-1, key k = image k // 2, mirrored when k is odd (decode + augment
    happen wherever the Dataset is read, i.e. in the DataLoader's workers)."""

    def __init__(self, split: ImageSplit, flips: bool = False):
        self.split, self.flips = split, flips

    def __len__(self) -> int:
        return len(self.split) * (2 if self.flips else 1)

    def __getitems__(self, keys: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        keys_B = torch.as_tensor(keys, dtype=torch.long)
        idx_B = keys_B // 2 if self.flips else keys_B
        images_BCHW = self.split.take(idx_B)
        if self.flips:
            mirror_B = (keys_B % 2).bool()
            images_BCHW = torch.where(mirror_B[:, None, None, None], images_BCHW.flip(-1), images_BCHW)
        return images_BCHW, self.split.labels_N[idx_B]

    def __getitem__(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        images_BCHW, labels_B = self.__getitems__([key])
        return images_BCHW[0], labels_B[0]


class ImagesOnly(Dataset):
    """The split's images alone, one uint8 (3, H, W) per item (what torch-fidelity reads)."""

    def __init__(self, split: ImageSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.split.take([i])[0]


def load_split(prepared_dir: str | os.PathLike, split: str, in_memory_mb: float = DEFAULT_IN_MEMORY_MB
               ) -> ImageSplit:
    """Open `split` ('train' or 'val') of the prepare stage's output: decoded into memory when its
    pixels take at most `in_memory_mb` MB, else left on disk (memory-mapped Arrow, decoded per batch)."""
    import datasets

    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"{prepared_dir} is not a prepared dataset; run the prepare stage (dvc repro prepare)")
    ds = datasets.load_from_disk(str(prepared_dir))[split]
    class_names = list(ds.features["label"].names)
    if ds._indices is not None:
        raise SplitError(f"{prepared_dir}/{split}: an indices mapping over the Arrow files; prepare writes plain "
                         f"files, rerun the prepare stage")
    labels_N = torch.as_tensor(np.asarray(ds.with_format("numpy")["label"]), dtype=torch.int64)
    arrow = ArrowImages([f["filename"] for f in ds.cache_files], len(ds))
    stats = prepared_dir / "stats.json"
    size = json.loads(stats.read_text()).get("resolution") if stats.is_file() else None
    on_disk = ImageSplit(None, labels_N, class_names, arrow=arrow, fingerprint=f"{ds._fingerprint}:{len(ds)}",
                         size=size)
    h, w = on_disk.image_hw
    if len(ds) * 3 * h * w > in_memory_mb * 2 ** 20:
        return on_disk
    images = on_disk.take(torch.arange(len(ds))) if len(ds) else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    return ImageSplit(images, labels_N, class_names, fingerprint=on_disk.fingerprint())


def load_stats(prepared_dir: str | os.PathLike) -> dict:
    return json.loads((Path(prepared_dir) / "stats.json").read_text())
