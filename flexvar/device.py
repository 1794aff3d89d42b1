"""Device and precision choice: one code path for CPU and CUDA, bf16 where it is fast."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import sys

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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc mallopt parameters (malloc.h)
GLIBC_MAX_MMAP_THRESHOLD = 32 << 20              # the largest value glibc accepts on 64-bit


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS; True when set.

    Why: a CPU training step allocates and frees ~100 MB of activations and gradients in blocks of
    0.1-20 MB. glibc serves such blocks with fresh mmap pages or trims them off the heap once freed, so
    every step page-faults them in again: 25-35k faults per step of the benchmark transformer (d6, batch 8),
    100k per sampled batch of 16 images. Serving blocks up to 32 MiB from the heap and never trimming it
    removes nearly all of them: transformer train steps 4-12% faster here (the official code's 2-7%;
    benchmarks/bench_malloc.py, docs/benchmarks.md). The cost: the process keeps its peak heap, which
    the next step needs again anyway. Process-wide (it speeds up any code in the process, the official
    code beside ours in a benchmark included); a no-op returning False where the C library is not glibc.
    Called by the transformer training stage only (pipeline/train_transformer.py): the tokenizer's
    train step measured 8-11% slower with it in two of three paired processes, and sampling did not move."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, GLIBC_MAX_MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
