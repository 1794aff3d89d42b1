"""A tiny randomly initialised FlexVAR + VQVAE saved as a real checkpoint folder (for generation tests)."""
from __future__ import annotations

from pathlib import Path

import torch

from flexvar.config import TokenizerConfig, TransformerConfig
from flexvar.checkpoint import file_sha256
from flexvar.tokenizer.vqvae import VQVAE, save_tokenizer, tokenizer_path
from flexvar.transformer.model import FlexVAR
from flexvar.transformer.checkpoint import save_flexvar

RES, LATENT, CLASSES = 16, 8, ["red", "green", "blue", "gray"]   # downsample 2: 16 px <-> 8x8 latent


def tiny_models(prediction: str = "gt", seed: int = 0, num_classes: int = len(CLASSES)) -> tuple[FlexVAR, VQVAE]:
    torch.manual_seed(seed)
    vq = VQVAE(TokenizerConfig(ch=8, ch_mult=[1, 2], z_channels=8, codebook_dim=8, codebook_size=32)).eval()
    model = FlexVAR(TransformerConfig(depth=2, width=32, heads=2, prediction=prediction), vocab_size=32,
                    codebook_dim=8, num_classes=num_classes, pe_size=LATENT)
    with torch.no_grad():   # random but far from the near-identity init, so every input matters
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval(), vq


def save_tiny_checkpoint(root: Path, prediction: str = "gt", class_names: list[str] = CLASSES) -> Path:
    """root/tokenizer/tokenizer.pt and root/d2/flexvar.pt; returns the model folder."""
    model, vq = tiny_models(prediction, num_classes=len(class_names))
    tok_dir, model_dir = root / "tokenizer", root / "d2"
    save_tokenizer(vq, vq.cfg, tok_dir)
    save_flexvar(model_dir, model, latent_hw=(LATENT, LATENT), downsample=vq.downsample, tokenizer_dir=str(tok_dir),
                 tokenizer_sha256=file_sha256(tokenizer_path(tok_dir)), class_names=class_names)
    return model_dir
