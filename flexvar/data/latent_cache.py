"""Cached tokenizer latents: run the frozen encoder once per image (and its mirror image).

Transformer training only needs the full-scale continuous latent of each image: the token maps
of any schedule are area-downsampled and quantised from it (flexvar/transformer/teacher_forcing.py), which
costs a tiny fraction of an encoder pass. So `extract_latents` stage encodes every image and its
horizontal flip once, and training reads `data/latents/{split}.pt`.

File layout (a plain dict, loaded with weights_only=True):
    kind "latents", latents_N2CHW float32 (index 1 on dim 1 = flipped image), labels_N int64,
    class_names, latent_hw, tokenizer_sha256 (which tokenizer made them).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flexvar.checkpoint import load_checkpoint, save_atomic
from flexvar.data.splits import ImageSplit, to_unit_range
from flexvar.device import autocast_ctx

LATENTS_KIND = "latents"


@dataclass
class LatentSplit:
    latents_N2CHW: torch.Tensor   # float32; [:, 0] the image, [:, 1] its horizontal flip
    labels_N: torch.Tensor        # int64
    class_names: list[str]
    tokenizer_sha256: str = ""

    def __len__(self) -> int:
        return len(self.labels_N)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.latents_N2CHW.shape[-2:])

    @property
    def codebook_dim(self) -> int:
        return self.latents_N2CHW.shape[2]


@torch.no_grad()
def encode_split(vqvae: torch.nn.Module, split: ImageSplit, batch_size: int, device: torch.device,
                 precision: str = "fp32") -> torch.Tensor:
    """Latents (N, 2, Cvae, H/f, W/f) of every image and its horizontal flip, in float32 on CPU."""
    vqvae.eval()
    out = []
    for start in range(0, len(split), batch_size):
        img_BCHW = to_unit_range(split.images_NCHW[start:start + batch_size]).to(device)
        both = torch.cat([img_BCHW, img_BCHW.flip(-1)])
        with autocast_ctx(device, precision):
            z = vqvae.encode(both).float().cpu()
        out.append(torch.stack(z.chunk(2), dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2, 1, 1, 1)


def save_latents(path: str | os.PathLike, latents_N2CHW: torch.Tensor, split: ImageSplit,
                 tokenizer_sha256: str) -> Path:
    save_atomic({"kind": LATENTS_KIND, "latents_N2CHW": latents_N2CHW.contiguous(), "labels_N": split.labels_N,
                 "class_names": list(split.class_names), "latent_hw": list(latents_N2CHW.shape[-2:]),
                 "tokenizer_sha256": tokenizer_sha256}, path)
    return Path(path)


def load_latents(latents_dir: str | os.PathLike, split: str) -> LatentSplit:
    """Read `latents_dir/{split}.pt` (CheckpointError naming the file if missing or of another kind)."""
    ckpt = load_checkpoint(Path(latents_dir) / f"{split}.pt", kind=LATENTS_KIND)
    return LatentSplit(ckpt["latents_N2CHW"], ckpt["labels_N"], list(ckpt["class_names"]),
                       ckpt.get("tokenizer_sha256", ""))
