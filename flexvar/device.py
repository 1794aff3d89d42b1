"""Device and precision choice: one code path for CPU and CUDA, bf16 where it is fast."""
from __future__ import annotations

import contextlib
import functools

import torch


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cpu' / 'cuda' / 'cuda:1' as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available; set it to 'auto' or 'cpu'")
    return torch.device(name)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(device: torch.device, precision: str) -> str:
    """'auto' -> 'bf16' on CUDA and on CPUs with native bf16, else 'fp32'."""
    if precision != "auto":
        return precision
    if device.type == "cuda" or cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def autocast_ctx(device: torch.device, precision: str):
    """A context in which matmuls and convs run in the resolved precision."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_cache_scope(device: torch.device):
    """A context that keeps autocast's low-precision weight copies alive across several `autocast_ctx`
    blocks (the steps of one generation): autocast drops its cache when the outermost autocast
    context exits, so an enclosing *disabled* one makes each weight cast once instead of once per
    block. Code between the blocks still runs without autocast."""
    return torch.autocast(device_type=device.type, enabled=False)
