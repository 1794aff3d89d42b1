"""One place that makes a run reproducible: seeds Python, NumPy and torch from params."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every RNG the pipeline touches; on request make torch pick deterministic kernels.

    Deterministic algorithms are enforced with `warn_only=True` so a CUDA op without a
    deterministic kernel warns instead of failing; on CPU every op the pipeline uses is exact.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
