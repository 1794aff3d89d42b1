"""Test helper: a random tiny tokenizer and structured cached latents (8x8, 4 classes) in a folder,
the inputs the train_transformer stage reads, made in well under a second."""
from __future__ import annotations

from pathlib import Path

import torch

from flexvar.config import TokenizerConfig
from flexvar.checkpoint import file_sha256
from flexvar.data.latent_cache import save_latents
from flexvar.tokenizer.vqvae import VQVAE, save_tokenizer

TINY_TOKENIZER = dict(ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=8, codebook_dim=8, codebook_size=64)


def write_tokenizer_and_latents(d: Path, num_train: int, num_val: int = 16) -> None:
    """d/tok: a seeded random tokenizer; d/lat/{train,val}/: class prototypes plus noise, and their flips."""
    tcfg = TokenizerConfig(**TINY_TOKENIZER)
    torch.manual_seed(0)
    save_tokenizer(VQVAE(tcfg), tcfg, d / "tok")
    sha = file_sha256(d / "tok" / "tokenizer.pt")
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(4, 8, 2, 2, generator=g)
    for split, n in (("train", num_train), ("val", num_val)):
        labels = torch.randint(0, 4, (n,), generator=g)
        z = torch.nn.functional.interpolate(protos[labels], size=(8, 8), mode="bilinear")
        z = z + 0.3 * torch.randn(z.shape, generator=g)
        save_latents(d / "lat" / split, torch.stack([z, z.flip(-1)], 1), labels, ["a", "b", "c", "d"], sha)
