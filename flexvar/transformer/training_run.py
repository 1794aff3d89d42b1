"""What one transformer training run starts from, built one way for every caller.

The train_transformer stage, the Ray Tune sweep's trials (flows/sweep.py) and the paper-figure
scripts (benchmarks/gt_vs_residual.py) all train from cached latents and a tokenizer's codebook:

    run = setup_run(params, depth, "data/latents", "models/tokenizer")
    train_transformer(run.model, run.quantizer, run.train, run.val, cfg, params.schedule,
                      prediction=run.transformer.prediction, fingerprint=run.fingerprint(cfg, params), ...)

Errors name the argument they come from (--latents, --tokenizer), as the stage's command line does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from flexvar.checkpoint import CheckpointError, file_sha256
from flexvar.config import Params, TrainTransformerConfig, TransformerConfig
from flexvar.data.latent_cache import LatentSplit, load_latents
from flexvar.errors import about
from flexvar.tokenizer.vqvae import load_tokenizer, tokenizer_path
from flexvar.transformer.model import FlexVAR
from flexvar.transformer.training import build_fingerprint


@dataclass
class TransformerRun:
    """A fresh model of one depth, the codebook it predicts, and the cached train/val latents."""
    model: FlexVAR | None
    quantizer: Any                 # the tokenizer's quantizer (codebook lookups), on the CPU
    train: LatentSplit
    val: LatentSplit
    transformer: TransformerConfig  # params.transformer at this depth (and prediction)
    tokenizer_sha256: str

    def new_model(self) -> FlexVAR:
        """A freshly initialised FlexVAR of this run's depth (from the current RNG state)."""
        return FlexVAR(self.transformer, self.quantizer.codebook_size, self.quantizer.codebook_dim,
                       self.train.num_classes, pe_size=self.transformer.pos_embed_size or max(self.train.latent_hw))

    def fingerprint(self, train_cfg: TrainTransformerConfig, params: Params, seed: int | None = None,
                    **extra: Any) -> dict:
        """What a resume file must match: settings, seed (params.seed unless given), tokenizer and latents of
        this run (+ `extra`); not the micro-batch, which changes how a step is computed, not what."""
        train = train_cfg.model_dump(mode="json", exclude={"micro_batch"})
        seed = params.seed if seed is None else seed
        return build_fingerprint(transformer=self.transformer, train=train, schedule=params.schedule, seed=seed,
                                 tokenizer_sha256=self.tokenizer_sha256,
                                 latents=[len(self.train), len(self.val), list(self.train.latent_hw)], **extra)


def setup_run(params: Params, depth: int, latents: str | os.PathLike, tokenizer: str | os.PathLike,
              prediction: str | None = None) -> TransformerRun:
    """Latents (memory-mapped when larger than data.in_memory_mb), the tokenizer's quantizer (checked to
    be the one the latents were extracted with) and a FlexVAR of `depth` (prediction: params' unless given)."""
    tcfg = params.transformer_for_depth(depth)
    if prediction is not None:
        tcfg = tcfg.model_copy(update={"prediction": prediction})
    with about("--latents"):
        train = load_latents(latents, "train", params.data.in_memory_mb)
        val = load_latents(latents, "val", params.data.in_memory_mb)
    with about("--tokenizer"):
        quantizer = load_tokenizer(tokenizer, "cpu").quantize
        sha = file_sha256(tokenizer_path(tokenizer))
        if train.tokenizer_sha256 and train.tokenizer_sha256 != sha:
            raise CheckpointError(f"{latents} was extracted with another tokenizer than {tokenizer}; "
                                  f"rerun extract_latents")
    run = TransformerRun(None, quantizer, train, val, tcfg, sha)
    run.model = run.new_model()
    return run


__all__ = ["TransformerRun", "setup_run"]
