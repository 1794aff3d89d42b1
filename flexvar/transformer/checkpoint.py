"""The transformer checkpoint generation samples from: `models/d{depth}/flexvar.pt`.

Holds everything generation needs besides the tokenizer weights: the exact TransformerConfig,
vocabulary/codebook sizes, number of classes (+ names), position-map size P, the training latent
size and resolution, and a reference to the tokenizer (its directory and sha256) — resolved
as given, else relative to the checkpoint folder, and checked against the hash.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from flexvar.checkpoint import CheckpointError, load_checkpoint, save_atomic
from flexvar.config import TransformerConfig
from flexvar.transformer.model import FlexVAR

FLEXVAR_FILE = "flexvar.pt"
FLEXVAR_KIND = "flexvar"


def save_flexvar(out_dir: str | os.PathLike, model: FlexVAR, *, latent_hw: tuple[int, int], downsample: int,
                 tokenizer_dir: str, tokenizer_sha256: str = "", class_names: list[str] | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write `out_dir/flexvar.pt` atomically; returns its path."""
    ckpt = {
        "kind": FLEXVAR_KIND,
        "config": model.cfg.model_dump(mode="json"),
        "vocab_size": model.vocab_size, "codebook_dim": model.codebook_dim,
        "num_classes": model.num_classes, "pe_size": model.pe_size,
        "class_names": list(class_names or []),
        "latent_hw": list(latent_hw), "downsample": downsample,
        "resolution": [latent_hw[0] * downsample, latent_hw[1] * downsample],
        "tokenizer_dir": str(tokenizer_dir), "tokenizer_sha256": tokenizer_sha256,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    path = Path(out_dir) / FLEXVAR_FILE
    save_atomic(ckpt, path)
    return path


def flexvar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / FLEXVAR_FILE if path.is_dir() else path


def load_flexvar(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[FlexVAR, dict[str, Any]]:
    """(model in eval mode on `device`, the checkpoint's metadata without the weights)."""
    file = flexvar_path(path)
    ckpt = load_checkpoint(file, kind=FLEXVAR_KIND)
    try:
        cfg = TransformerConfig(**ckpt["config"])
        model = FlexVAR(cfg, ckpt["vocab_size"], ckpt["codebook_dim"], ckpt["num_classes"], ckpt["pe_size"])
        model.load_state_dict(ckpt["model"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {file}: cannot rebuild the transformer: {str(e).splitlines()[0][:300]}") from e
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    return model.to(device).eval(), meta


def resolve_tokenizer_dir(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """The tokenizer folder a transformer checkpoint refers to: as stored, else relative to it."""
    file = flexvar_path(path)
    meta = meta if meta is not None else {k: v for k, v in load_checkpoint(file, kind=FLEXVAR_KIND).items() if k != "model"}
    stored = Path(meta["tokenizer_dir"])
    for cand in (stored, file.parent / stored, file.parent / stored.name, file.parent.parent / stored.name):
        if cand.exists():
            return cand
    raise CheckpointError(f"checkpoint {file} refers to tokenizer {stored}, which does not exist; "
                          f"pass the tokenizer folder explicitly")


def load_flexvar_with_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu",
                                tokenizer_dir: str | os.PathLike | None = None):
    """(transformer, tokenizer VQVAE, metadata); the tokenizer's sha256 must match the one trained with.

    `tokenizer_dir` overrides the folder stored in the checkpoint (e.g. a copied project)."""
    from flexvar.checkpoint import file_sha256
    from flexvar.tokenizer.vqvae import load_tokenizer, tokenizer_path

    model, meta = load_flexvar(path, device)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else resolve_tokenizer_dir(path, meta)
    if not tokenizer_path(tok_dir).is_file():
        raise CheckpointError(f"tokenizer checkpoint {tokenizer_path(tok_dir)} does not exist")
    want = meta.get("tokenizer_sha256")
    if want and file_sha256(tokenizer_path(tok_dir)) != want:
        raise CheckpointError(f"tokenizer {tok_dir} is not the one {flexvar_path(path)} was trained with "
                              f"(sha256 differs); retrain or point to the original tokenizer")
    vqvae = load_tokenizer(tok_dir, device)
    have = (vqvae.quantize.codebook_size, vqvae.quantize.codebook_dim)
    if have != (model.vocab_size, model.codebook_dim):
        raise CheckpointError(f"tokenizer {tok_dir} (codebook {have[0]} x {have[1]}) does not belong to "
                              f"{flexvar_path(path)} (vocabulary {model.vocab_size} x {model.codebook_dim}); "
                              f"point to the tokenizer it was trained with")
    return model, vqvae, meta
