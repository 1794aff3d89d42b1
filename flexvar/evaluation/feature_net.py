"""A small image classifier trained on the prepared data: the offline 'domain' feature space.

Inception-v3 features (the paper's FID) need downloaded weights and say little about 64 px
synthetic shapes. This network is trained by the pipeline itself (`train_feature_net` stage) on
the train split; its pooled penultimate activations are the features for FID/KID/precision/recall
and its logits the class posterior for the Inception Score — all reported as `*_domain`, never as
plain FID. Inputs of any size are resized to the training resolution, so 96 px samples of a
64 px model are scored in the same space.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexvar.checkpoint import load_checkpoint, save_atomic
from flexvar.data.sampling import RangeBatchSampler
from flexvar.data.splits import ImageSplit, to_unit_range
from flexvar.device import autocast_ctx
from flexvar.optim import warmup_cosine_factor
from flexvar.run_logger import RunLogger

KIND = "feature_net"
WIDTH = 16          # channels of the first block; doubled at each downsampling
FEATURE_DIM = 64    # dimension of the domain feature space (small: FID's covariance needs N >> dim)


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(8, c_out), nn.SiLU())


class FeatureNet(nn.Module):
    """conv stack -> global average pool -> features_BD -> linear -> logits_BK."""

    def __init__(self, num_classes: int, resolution: int, width: int = WIDTH, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.config = {"num_classes": num_classes, "resolution": resolution, "width": width,
                       "feature_dim": feature_dim}
        self.resolution = resolution
        self.body = nn.Sequential(
            _block(3, width, 2),                                                # H/2
            _block(width, 2 * width, 2), _block(2 * width, 2 * width, 1),       # H/4
            _block(2 * width, 4 * width, 2), _block(4 * width, 4 * width, 1),   # H/8
            _block(4 * width, feature_dim, 1),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def to_input(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """uint8 images of any size -> float [-1, 1] at the training resolution (antialiased resize)."""
        x_BCHW = to_unit_range(images_BCHW)
        if tuple(x_BCHW.shape[-2:]) != (self.resolution, self.resolution):
            x_BCHW = F.interpolate(x_BCHW, size=(self.resolution, self.resolution), mode="bilinear",
                                   align_corners=False, antialias=True)
        return x_BCHW

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float input in [-1, 1] -> (features_BD, logits_BK)."""
        features_BD = self.body(x_BCHW).mean(dim=(2, 3))
        return features_BD, self.head(features_BD)


def save_feature_net(model: FeatureNet, path: str | os.PathLike, metrics: dict[str, float]) -> None:
    save_atomic({"kind": KIND, "config": model.config, "model": model.state_dict(), "metrics": metrics}, path)


def load_feature_net(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FeatureNet:
    ckpt = load_checkpoint(path, kind=KIND, map_location=map_location)
    model = FeatureNet(**ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.eval().requires_grad_(False)


def feature_net_metrics(path: str | os.PathLike) -> dict[str, float]:
    """The metrics saved with the checkpoint at training time (val_accuracy, val_loss)."""
    return dict(load_checkpoint(path, kind=KIND)["metrics"])


@torch.no_grad()
def evaluate_feature_net(model: FeatureNet, split: ImageSplit, device: torch.device,
                         batch_size: int = 256, num_workers: int = 0) -> dict[str, float]:
    """Accuracy and mean cross-entropy on a split (read batch by batch)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for images_BCHW, labels_B in split.loader(RangeBatchSampler(len(split), batch_size), num_workers):
        x_BCHW = model.to_input(images_BCHW.to(device))
        y_B = labels_B.to(device)
        _, logits_BK = model(x_BCHW)
        loss_sum += F.cross_entropy(logits_BK.float(), y_B, reduction="sum").item()
        correct += (logits_BK.argmax(-1) == y_B).sum().item()
    n = max(len(split), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n}


class RandomFlipBatches(torch.utils.data.Sampler):
    """`steps` batches of random (image, flip) keys 2 * i + flip (SplitImages' flip convention), seeded."""

    def __init__(self, n_images: int, batch_size: int, steps: int, seed: int):
        self.n, self.batch_size, self.steps, self.seed = n_images, batch_size, steps, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            idx_B = torch.randint(self.n, (self.batch_size,), generator=gen)
            flip_B = torch.rand(self.batch_size, generator=gen) < 0.5
            yield (2 * idx_B + flip_B.long()).tolist()

    def __len__(self) -> int:
        return self.steps


def train_feature_net(train: ImageSplit, val: ImageSplit, steps: int, batch_size: int, lr: float,
                      device: torch.device, seed: int, logger: RunLogger | None = None,
                      precision: str | None = None, log_every: int = 25,
                      num_workers: int = 0) -> tuple[FeatureNet, dict[str, float]]:
    """Train the classifier with AdamW on random batches (horizontal flips); return it and its val metrics.

    Batches are decoded and flipped by the split's loader (in `num_workers` processes when on disk).

    precision None: bf16 autocast on CUDA, fp32 on CPU (bf16 convolutions are slower than fp32 on CPUs).
    """
    logger = logger or RunLogger()
    precision = precision or ("auto" if device.type == "cuda" else "fp32")
    torch.manual_seed(seed)
    model = FeatureNet(train.num_classes, int(train.image_hw[-1])).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(   # warmup, then cosine to 10% of lr
        opt, lambda s: warmup_cosine_factor(s, min(20, steps // 10), steps, 0.1))
    batches = train.loader(RandomFlipBatches(len(train), batch_size, steps, seed), num_workers, flips=True)
    for step, (images_BCHW, labels_B) in enumerate(batches):
        model.train()
        x_BCHW, y_B = model.to_input(images_BCHW.to(device)), labels_B.to(device)
        with autocast_ctx(device, precision):
            _, logits_BK = model(x_BCHW)
        loss = F.cross_entropy(logits_BK.float(), y_B)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if step % log_every == 0 or step == steps - 1:
            acc = (logits_BK.argmax(-1) == y_B).float().mean().item()
            logger.log_metrics({"train_loss": loss.item(), "train_accuracy": acc}, step=step)
    val_metrics = {f"val_{k}": v for k, v in evaluate_feature_net(model, val, device, num_workers=num_workers).items()}
    logger.log_metrics(val_metrics, step=steps)
    return model.eval().requires_grad_(False), val_metrics
