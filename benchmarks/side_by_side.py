"""Shared pieces of the side-by-side benchmarks: importing the official FlexVAR code from its folder,
interleaving variants over rounds, and the machine's state (load, matmul rate) in the same run.

The official code is never vendored: `official_modules()` imports it at run time from the folder
named by FLEXVAR_OFFICIAL_DIR and returns None (with a one-line reason) when that is unset, missing
or needs packages this environment lacks. Variants are timed in interleaved rounds (A B C, A B C,
...) so that a change in the machine's load hits every variant alike; figures are medians with
the spread (min..max) and the 1-minute load average before and after.
"""
from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from pipeline.env import retain_freed_memory

OFFICIAL_ENV = "FLEXVAR_OFFICIAL_DIR"


def official_modules() -> tuple[SimpleNamespace | None, str]:
    """(official FlexVAR modules, note). Modules: `FlexVAR` (transformer class), `VQ_16` (LlamaGen VQ-16
    constructor), `sample_top_k_top_p` (their sampler). None with the reason when not importable."""
    folder = os.environ.get(OFFICIAL_ENV, "")
    if not folder:
        return None, f"{OFFICIAL_ENV} is not set: official code not run, ours alone"
    if not (Path(folder) / "models" / "flexvar.py").is_file():
        return None, f"{OFFICIAL_ENV}={folder} holds no models/flexvar.py: official code not run, ours alone"
    sys.path.insert(0, str(Path(folder).resolve()))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from models.flexvar import FlexVAR
            from models.helpers import sample_with_top_k_top_p_
            from models.vq_llama import VQ_16
    except ImportError as e:
        return None, f"official code at {folder} needs a missing package ({e}); pip install it to compare"
    finally:
        sys.path.remove(str(Path(folder).resolve()))
    return SimpleNamespace(FlexVAR=FlexVAR, VQ_16=VQ_16, sample_top_k_top_p=sample_with_top_k_top_p_), f"official code from {folder}"


def quiet(fn: Callable, *args, **kwargs):
    """Call `fn` with its prints (the official constructors print parameter counts) swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def bf16_autocast(enabled: bool):
    """CPU bf16 autocast (the official trainer's `--fp16 2` setting, on this device) or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 4, trials: int = 5) -> float:
    """This machine's square-matmul rate right now (the ceiling every figure is held against): the best of
    `trials` timings of `reps` products after a warm-up. One timing straight after the process started
    read as low as 128 GFLOP/s bf16 while the same run's steps reached 190+."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return round(2 * n ** 3 * reps / best / 1e9, 1)


def add_threads_arg(ap, rounds: int | None = None, malloc: str = "retained") -> None:
    """--threads, --malloc (default `malloc`: the setting of the pipeline stage the workload belongs to),
    and with `rounds` the interleaved benchmarks' --rounds (its default)."""
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch's default); 1 keeps ratios stable on a crowded machine")
    ap.add_argument("--malloc", choices=("retained", "default"), default=malloc,
                    help="glibc malloc for both codes (process-wide): 'retained' keeps freed memory for reuse "
                         "(pipeline.env.retain_freed_memory, as the transformer training stage runs), 'default' "
                         "keeps glibc's defaults (as the sampling and tokenizer stages run); default here: "
                         f"{malloc}, as this workload's stage")
    if rounds is not None:
        ap.add_argument("--rounds", type=int, default=rounds, help="timed interleaved rounds (after one warm-up round)")


def set_threads(n: int) -> None:
    if n:
        torch.set_num_threads(n)


MALLOC = {"setting": "glibc default"}


def setup_process(args) -> None:
    """--threads, and --malloc retained: freed memory kept for reuse, for both codes."""
    set_threads(args.threads)
    if args.malloc == "retained" and retain_freed_memory():
        MALLOC["setting"] = "freed memory retained (both codes)"


def cpu_model() -> str:
    """The CPU's name and x86 family/model from /proc/cpuinfo (e.g. "AMD EPYC, family 26 model 2"):
    machines sold under one name differ by generation, and with it by their matmul rate and by ratios
    (a vendor's family number tells the generations apart). platform.processor() elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return platform.processor() or "unknown"
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    family = f", family {info['cpu family']} model {info.get('model', '?')}" if "cpu family" in info else ""
    return info.get("model name", platform.processor() or "unknown") + family


def machine() -> dict:
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "malloc": MALLOC["setting"],
            "matmul_gflops_fp32": matmul_gflops(torch.float32), "matmul_gflops_bf16": matmul_gflops(torch.bfloat16)}


def interleave(variants: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, dict]:
    """Time each variant once per round, in turn, after `warmup` untimed rounds.

    Per variant: wall seconds (median, min, max, every round) and this process's CPU seconds
    (`cpu_median_s`). On a crowded machine a single-threaded run's CPU time leaves out the time the
    scheduler gave to other processes, so it is the steadier figure; `ratios` uses it when the run
    has one thread, the wall time otherwise."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {name: {"median_s": round(statistics.median(ts), 4), "min_s": round(min(ts), 4), "max_s": round(max(ts), 4),
                   "cpu_median_s": round(statistics.median(cpu[name]), 4), "rounds_s": [round(t, 4) for t in ts],
                   "rounds_cpu_s": [round(t, 4) for t in cpu[name]]} for name, ts in wall.items()}


def timing_key() -> str:
    """The figure ratios are taken on: CPU seconds with one thread, wall seconds otherwise."""
    return "cpu_median_s" if torch.get_num_threads() == 1 else "median_s"


def ratios(results: dict[str, dict], ours: str) -> dict[str, float]:
    """How many times faster `ours` is than every other variant (medians, on `timing_key()`)."""
    key = timing_key()
    base = results[ours][key]
    return {f"{ours} vs {name}": round(r[key] / base, 2) for name, r in results.items() if name != ours}

