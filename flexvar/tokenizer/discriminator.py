"""PatchGAN discriminator and hinge losses for the tokenizer's optional adversarial term.

A stack of stride-2 4x4 convs (LeakyReLU 0.2, BatchNorm after the first) that scores each
overlapping patch as real or fake. Inputs smaller than `MIN_SIDE` are upsampled first so the
last layers still see a spatial map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_SIDE = 32


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> patch logits (B, 1, h, w)."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = width
        for n in range(1, n_layers + 1):
            c_out = width * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, img_BCHW: torch.Tensor) -> torch.Tensor:
        if min(img_BCHW.shape[-2:]) < MIN_SIDE:
            size = [max(MIN_SIDE, s) for s in img_BCHW.shape[-2:]]
            img_BCHW = F.interpolate(img_BCHW, size=size, mode="bilinear", align_corners=False)
        return self.main(img_BCHW)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: raise the discriminator's score of reconstructions."""
    return -fake_logits.mean()
