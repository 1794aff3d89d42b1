"""Cached tokenizer latents: run the frozen encoder once per view of each image.

Transformer training only needs the full-scale continuous latent of each image: the token maps
of any schedule are area-downsampled and quantised from it (flexvar/transformer/teacher_forcing.py), which
costs a tiny fraction of an encoder pass. So `extract_latents` stage encodes V views of every image
once, and training reads one of them per image and step from `data/latents/{split}/`. The views
(`data.augment`, flexvar/data/augment.py): center = the centre crop and its horizontal flip (V = 2);
official = `data.augment_views` official random crops + flips, each seeded by (seed, image, view)
(LlamaGen's extract_codes_c2i.py --ten-crop also caches ten views per image, there TenCrop's five
fixed crops of a 1.1x centre crop and their flips; here ten draws of FlexVAR's own random crop).

Layout of `{split}/` (written to a temp folder, renamed into place when complete):
    meta.json          kind "latents", num_images, shard_items, shape (V, Cvae, h, w), dtype,
                       class_names, tokenizer_sha256 (which tokenizer made them), augment
    labels.npy         int64 (N,)
    shard_{k:05d}.npy  (n_k, V, Cvae, h, w) in `dtype` (center: index 1 on dim 1 = flipped image),
                       shard_items images each (the last one: the rest)
Shards are written block by block (O(batch) memory) and read with np.load(mmap_mode='r'):
training gathers random rows from the memory maps, so every worker on a node shares one copy of
the cache through the page cache instead of holding its own, and releases the pages it read from
its own mapping after each gather (RSS bounded by the batch, not by what an epoch touched). Splits whose float32 latents fit in
`data.in_memory_mb` are loaded into one tensor instead (the embedded default's fast path).
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import DataLoader
from tqdm import tqdm

from flexvar.checkpoint import CheckpointError
from flexvar.data.arrays import NpyWriter
from flexvar.data.splits import DEFAULT_IN_MEMORY_MB, to_unit_range

LATENTS_KIND = "latents"
SHARD_ITEMS = 4096
META = "meta.json"


def release(array: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process (madvise MADV_DONTNEED) once rows were
    copied out: they stay in the page cache that every worker of the node shares, but a worker
    gathering random rows for an epoch does not end up holding the whole cache in its RSS."""
    mm = getattr(array, "_mmap", None)        # numpy.memmap's mmap.mmap
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


class MappedLatents:
    """(N, V, C, h, w) latents spread over memory-mapped shards, indexed like a tensor for the two
    ways training reads them: [rows, views] (index tensors) and [slice, view]. Returns float32 tensors.
    Maps open lazily in each process (pickling sends paths, never data)."""

    def __init__(self, shard_paths: list[Path], shard_items: int, shape: tuple[int, ...]):
        self.shard_paths, self.shard_items, self.shape = [Path(p) for p in shard_paths], shard_items, tuple(shape)
        self._maps: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def __len__(self) -> int:
        return self.shape[0]

    def maps(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.load(p, mmap_mode="r") for p in self.shard_paths]
        return self._maps

    def __getitem__(self, key) -> torch.Tensor:
        rows, flips = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(rows, slice):
            rows = torch.arange(*rows.indices(self.shape[0]))
        rows_B = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        flips_B = (torch.as_tensor(flips, dtype=torch.long).expand_as(rows_B) if not isinstance(flips, slice) else None)
        shard_B, offset_B = rows_B // self.shard_items, rows_B % self.shard_items
        out = torch.empty((len(rows_B), *(self.shape[2:] if flips_B is not None else self.shape[1:])))
        maps = self.maps()
        for k in shard_B.unique().tolist():
            sel = (shard_B == k).nonzero().squeeze(1)
            off = offset_B[sel].numpy()
            block = maps[k][off, flips_B[sel].numpy()] if flips_B is not None else maps[k][off]
            out[sel] = torch.from_numpy(np.asarray(block, dtype=np.float32))
            release(maps[k])
        return out


@dataclass
class LatentSplit:
    latents_N2CHW: torch.Tensor | MappedLatents   # float32 (N, V, C, h, w); center: [:, 0] the image, [:, 1] its flip
    labels_N: torch.Tensor        # int64
    class_names: list[str]
    tokenizer_sha256: str = ""

    def __len__(self) -> int:
        return len(self.labels_N)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_views(self) -> int:
        """Cached views per image (dim 1): 2 for center (image, flip), data.augment_views for official."""
        return self.latents_N2CHW.shape[1]

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.latents_N2CHW.shape[-2:])

    @property
    def codebook_dim(self) -> int:
        return self.latents_N2CHW.shape[2]

    @property
    def in_memory(self) -> bool:
        return torch.is_tensor(self.latents_N2CHW)


Encoder = Callable[[torch.Tensor], torch.Tensor]   # images in [-1, 1] (B, 3, H, W) -> latents (B, Cvae, h, w)


@torch.no_grad()
def encode_batches(encode: Encoder, loader: Iterable, device: torch.device
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(latents (B, 2, Cvae, H/f, W/f) float32 on CPU of each image and its flip, labels (B,)) per batch
    of a loader of (uint8 images, labels). `encode`: the frozen tokenizer's encoder, e.g.
    `functools.partial(flexvar.tokenizer.bf16_copy.encode_images, vqvae, precision=...)`."""
    for images_BCHW, labels_B in loader:
        img_BCHW = to_unit_range(images_BCHW).to(device)
        both = torch.cat([img_BCHW, img_BCHW.flip(-1)])
        z = encode(both).float().cpu()
        yield torch.stack(z.chunk(2), dim=1), labels_B


@torch.no_grad()
def encode_view_batches(encode: Encoder, loader: Iterable, views: int, device: torch.device
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(latents (B, V, Cvae, H/f, W/f) float32 on CPU, labels (B,)) per batch of a loader of ready-made
    views: (uint8 images (B*V, 3, H, W) image-major, labels (B*V,)), e.g. flexvar/data/augment.py's."""
    for images_KCHW, labels_K in loader:
        z_KCHW = encode(to_unit_range(images_KCHW).to(device)).float().cpu()
        yield rearrange(z_KCHW, "(b v) c h w -> b v c h w", v=views), labels_K[::views]


class LatentWriter:
    """Writes one split's cache incrementally: `write(z_B2CHW, labels_B)` in order, then `close()`
    renames the completed folder into place (nothing half-written is ever at `out_dir`)."""

    def __init__(self, out_dir: str | os.PathLike, num_images: int, shape_2CHW: tuple[int, ...],
                 class_names: list[str], tokenizer_sha256: str, dtype: str = "float32",
                 shard_items: int = SHARD_ITEMS, augment: str = "center"):
        self.out_dir, self.n, self.shape, self.dtype = Path(out_dir), num_images, tuple(shape_2CHW), np.dtype(dtype)
        self.shard_items = shard_items
        self.meta = {"kind": LATENTS_KIND, "num_images": num_images, "shard_items": shard_items,
                     "shape": list(self.shape), "dtype": self.dtype.name, "class_names": list(class_names),
                     "tokenizer_sha256": tokenizer_sha256, "augment": augment}
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.tmp"))
        self._labels_f = open(self.tmp / "labels.npy", "wb")
        self._labels = NpyWriter(self._labels_f, (num_images,), np.int64, "labels")
        self.written, self._shard, self._shard_f = 0, None, None

    def _next_shard(self) -> None:
        self._close_shard()
        k = self.written // self.shard_items
        rows = min(self.shard_items, self.n - self.written)
        self._shard_f = open(self.tmp / f"shard_{k:05d}.npy", "wb")
        self._shard = NpyWriter(self._shard_f, (rows, *self.shape), self.dtype, f"shard {k}")

    def _close_shard(self) -> None:
        if self._shard is not None:
            self._shard.close()
            self._shard_f.close()
            self._shard = None

    def write(self, z_B2CHW: torch.Tensor, labels_B: torch.Tensor) -> None:
        z = z_B2CHW.numpy()
        if len(z) != len(labels_B) or self.written + len(z) > self.n:
            self.abort()
            raise ValueError(f"{self.out_dir}: {len(z)} latents with {len(labels_B)} labels after {self.written} "
                             f"do not fit the declared {self.n}")
        self._labels.write(labels_B.numpy().astype(np.int64))
        while len(z):
            if self._shard is None or self._shard.rows == self._shard.shape[0]:
                self._next_shard()
            room = self._shard.shape[0] - self._shard.rows
            self._shard.write(z[:room])
            self.written += min(room, len(z))
            z = z[room:]

    def close(self) -> Path:
        if self.written != self.n:
            self.abort()
            raise ValueError(f"{self.out_dir}: {self.written} latents written, {self.n} expected")
        self._close_shard()
        self._labels.close()
        self._labels_f.close()
        (self.tmp / META).write_text(json.dumps(self.meta, indent=1) + "\n")
        self.tmp.chmod(0o755)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        for f in (self._labels_f, self._shard_f):
            if f is not None:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def extract_split(encode: Encoder, loader: DataLoader, out_dir: str | os.PathLike, num_images: int,
                  class_names: list[str], tokenizer_sha256: str, device: torch.device, dtype: str = "float32",
                  views: int | None = None) -> Path:
    """Encode (`encode`, see encode_batches) every batch of `loader` and write the split's cache at `out_dir`;
    O(batch) memory. views None: a loader of images, cached with their flips (center); else a loader of
    `views` ready-made views per image (official)."""
    writer = None
    batches = (encode_batches(encode, loader, device) if views is None
               else encode_view_batches(encode, loader, views, device))
    progress = tqdm(total=num_images, desc=f"extract_latents {Path(out_dir).name}", unit="img", mininterval=10)
    try:
        for z_BVCHW, labels_B in batches:
            progress.update(len(labels_B))
            if writer is None:
                writer = LatentWriter(out_dir, num_images, tuple(z_BVCHW.shape[1:]), class_names, tokenizer_sha256,
                                      dtype, augment="center" if views is None else "official")
            writer.write(z_BVCHW, labels_B)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        progress.close()
    if writer is None:
        raise ValueError(f"{out_dir}: no images to encode")
    return writer.close()


def save_latents(out_dir: str | os.PathLike, latents_N2CHW: torch.Tensor, labels_N: torch.Tensor,
                 class_names: list[str], tokenizer_sha256: str, dtype: str = "float32",
                 shard_items: int = SHARD_ITEMS, block: int = 1024) -> Path:
    """Write latents already in memory as a split's cache (tests, small tools), `block` rows at a time."""
    writer = LatentWriter(out_dir, len(labels_N), tuple(latents_N2CHW.shape[1:]), class_names, tokenizer_sha256, dtype,
                          shard_items)
    for s in range(0, len(labels_N), block):
        writer.write(latents_N2CHW[s:s + block].float(), labels_N[s:s + block])
    return writer.close()


def load_latents(latents_dir: str | os.PathLike, split: str, in_memory_mb: float = DEFAULT_IN_MEMORY_MB
                 ) -> LatentSplit:
    """Open `latents_dir/{split}/` (CheckpointError naming the folder if missing or of another kind):
    one float32 tensor when it fits in `in_memory_mb` MB, else memory-mapped shards."""
    d = Path(latents_dir) / split
    meta_path = d / META
    if not meta_path.is_file():
        raise CheckpointError(f"{d} is not a latent cache (no {META}); run the extract_latents stage")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") != LATENTS_KIND:
        raise CheckpointError(f"{meta_path}: kind {meta.get('kind')!r}, expected {LATENTS_KIND!r}")
    n, shape = int(meta["num_images"]), (int(meta["num_images"]), *meta["shape"])
    shards = [d / f"shard_{k:05d}.npy" for k in range(-(-n // int(meta["shard_items"])))]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]} is missing; rerun the extract_latents stage")
    labels_N = torch.from_numpy(np.load(d / "labels.npy"))
    latents = MappedLatents(shards, int(meta["shard_items"]), shape)
    if n * int(np.prod(shape[1:])) * 4 <= in_memory_mb * 2 ** 20:
        latents = torch.from_numpy(np.concatenate([np.load(p).astype(np.float32) for p in shards]))
    return LatentSplit(latents, labels_N, list(meta["class_names"]), meta.get("tokenizer_sha256", ""))
