"""LPIPS-style perceptual loss on VGG16 features, loaded only from a local file (never downloaded).

Distance = sum over the relu1_2 .. relu5_3 feature maps of the spatially averaged, channel-
weighted squared difference of unit-normalised features. The channel weights are LPIPS's learned
linear layers when the weights file carries them (`lin{0..4}.model.*.weight`), else uniform
(1/C, i.e. the plain normalised-feature distance).

The weights file is a torch state dict holding torchvision's VGG16 `features.N.weight/bias` keys
(e.g. a saved `torchvision.models.vgg16(...).state_dict()`), optionally merged with LPIPS's
linear layers. Its path comes from `train_tokenizer.perceptual_weights_path`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

PARAM = "train_tokenizer.perceptual_weights_path"
TAPS = (3, 8, 15, 22, 29)                 # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)          # LPIPS input scaling for images in [-1, 1]
SCALE = (0.458, 0.448, 0.450)
MIN_SIDE = 32                             # smaller inputs are upsampled so relu5_3 keeps >= 2x2 positions


class PerceptualLoss(nn.Module):
    """Frozen VGG16 feature distance between two image batches in [-1, 1]; returns (B,) distances."""

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        state = read_weights(weights_path)
        self.features = make_layers(cfgs["D"])[: TAPS[-1] + 1]     # VGG16 conv trunk, no classifier
        feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(feats, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{weights_path} (from {PARAM}) does not hold VGG16 features: "
                             f"{str(e).splitlines()[0][:200]}") from e
        for i, c in enumerate(CHANNELS):
            lin = next((v for k, v in state.items() if re.fullmatch(rf"lin{i}\.model\.\d\.weight", k)), None)
            w_C = lin.reshape(-1).float() if lin is not None else torch.full((c,), 1.0 / c)
            self.register_buffer(f"w{i}", w_C.view(1, c, 1, 1))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)       # always frozen, always eval

    def forward(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
        if min(x_BCHW.shape[-2:]) < MIN_SIDE:
            size = [max(MIN_SIDE, s) for s in x_BCHW.shape[-2:]]
            x_BCHW, y_BCHW = (F.interpolate(t, size=size, mode="bilinear", align_corners=False) for t in (x_BCHW, y_BCHW))
        h = torch.cat([x_BCHW, y_BCHW]).sub(self.shift).div(self.scale)
        dist_B = 0.0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                fx, fy = unit_channels(h).chunk(2)
                dist_B = dist_B + ((fx - fy) ** 2 * getattr(self, f"w{TAPS.index(i)}")).sum(1).mean((1, 2))
        return dist_B


def unit_channels(f_BCHW: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    f_BCHW = f_BCHW.float()
    return f_BCHW / (f_BCHW.pow(2).sum(1, keepdim=True).sqrt() + eps)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load the local weights file or explain, naming the param, why it cannot be used."""
    if not str(path):
        raise FileNotFoundError(f"the perceptual loss is on but {PARAM} is empty: set it to a local VGG16 "
                                f"weights file (torchvision vgg16 state dict) or set "
                                f"train_tokenizer.perceptual_weight to 0; nothing is downloaded")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{PARAM} = {str(path)!r}: no such file; point it at a local VGG16 weights file "
                                f"or set train_tokenizer.perceptual_weight to 0; nothing is downloaded")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} (from {PARAM}) is not a state dict")
    return state
