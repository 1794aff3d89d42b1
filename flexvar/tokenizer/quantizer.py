"""Multi-scale vector quantiser: one l2-normalised codebook shared by every scale.

FlexVAR's tokenizer quantises the same continuous latent at many resolutions: the latent is
area-downsampled to (h, w) and each vector is snapped to its nearest code by cosine similarity.
The codebook (LlamaGen VQ-16 layout, `embedding.weight`) is shared by all scales, so a token id
means the same thing whatever the step.

    >>> q = MultiScaleQuantizer(codebook_size=16, codebook_dim=4)
    >>> idx_Bhw, zq_BChw = q.quantize(torch.randn(2, 4, 8, 8), (3, 5))
    >>> tuple(idx_Bhw.shape), tuple(zq_BChw.shape)
    ((2, 3, 5), (2, 4, 3, 5))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, p=2, dim=dim)


def downsample(z_BCHW: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Area-downsample a latent to (h, w); identity at the full size (no copy)."""
    if tuple(z_BCHW.shape[-2:]) == tuple(hw):
        return z_BCHW
    return F.interpolate(z_BCHW, size=tuple(hw), mode="area")


class MultiScaleQuantizer(nn.Module):
    """Cosine nearest-code quantiser with straight-through gradients, VQ losses and usage stats."""

    def __init__(self, codebook_size: int, codebook_dim: int, beta: float = 0.25,
                 entropy_weight: float = 0.0, entropy_temperature: float = 0.01):
        super().__init__()
        self.codebook_size, self.codebook_dim = codebook_size, codebook_dim
        self.beta, self.entropy_weight, self.entropy_temperature = beta, entropy_weight, entropy_temperature
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        # unit-norm raw weights (as LlamaGen does for l2-normalised codebooks): with the tiny uniform
        # init alone, each optimiser step would swing the codes' directions at random
        self.embedding.weight.data = l2norm(self.embedding.weight.data, dim=-1)

    def codebook(self) -> torch.Tensor:
        """The l2-normalised codebook, (V, C)."""
        return l2norm(self.embedding.weight, dim=-1)

    def lookup(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h, w) -> normalised code vectors (B, C, h, w)."""
        return rearrange(F.embedding(idx_Bhw, self.codebook()), "b h w c -> b c h w")

    def _similarity(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every latent vector to every code, (B*h*w, V), in fp32."""
        z_NC = l2norm(rearrange(z_BChw, "b c h w -> (b h w) c").float(), dim=-1)
        return z_NC @ self.codebook().float().t()

    @torch.no_grad()
    def nearest(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Id of the nearest code by cosine for each latent vector, (B, h, w)."""
        B, _, h, w = z_BChw.shape
        return self._similarity(z_BChw).argmax(dim=-1).view(B, h, w)

    @torch.no_grad()
    def quantize(self, z_BCHW: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise a full-scale latent at scale (h, w): (ids (B, h, w), code vectors (B, C, h, w))."""
        idx_Bhw = self.nearest(downsample(z_BCHW, hw))
        return idx_Bhw, self.lookup(idx_Bhw)

    def forward(self, z_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Training-time quantisation at the latent's own scale.

        Returns straight-through code vectors (gradients flow to z), ids, and the losses:
        `codebook` (codes move to the encoder outputs), `commit` (beta-weighted, encoder moves to
        the codes), `entropy` (optional, spreads usage) and the batch's `perplexity`/`usage`.
        """
        z_BChw = l2norm(z_BChw.float(), dim=1)
        sim_NV = self._similarity(z_BChw)
        B, _, h, w = z_BChw.shape
        idx_Bhw = sim_NV.argmax(dim=-1).view(B, h, w)
        zq_BChw = self.lookup(idx_Bhw)
        losses = {
            "codebook": F.mse_loss(zq_BChw, z_BChw.detach()),
            "commit": self.beta * F.mse_loss(z_BChw, zq_BChw.detach()),
        }
        if self.entropy_weight > 0:
            losses["entropy"] = self.entropy_weight * entropy_loss(sim_NV / self.entropy_temperature)
        counts_V = torch.bincount(idx_Bhw.flatten(), minlength=self.codebook_size).float()
        probs_V = counts_V / counts_V.sum()
        losses["perplexity"] = torch.exp(-(probs_V * torch.log(probs_V + 1e-10)).sum()).detach()
        losses["usage"] = (counts_V > 0).float().mean().detach()
        zq_st_BChw = z_BChw + (zq_BChw - z_BChw).detach()
        return zq_st_BChw, idx_Bhw, losses


def entropy_loss(logits_NV: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy minus batch entropy: confident assignments that still use many codes."""
    probs_NV = logits_NV.softmax(dim=-1)
    per_sample = -(probs_NV * torch.log(probs_NV + 1e-10)).sum(-1).mean()
    avg_V = probs_NV.mean(0)
    batch = -(avg_V * torch.log(avg_V + 1e-10)).sum()
    return per_sample - batch
