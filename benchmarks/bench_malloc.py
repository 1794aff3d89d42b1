"""What `flexvar.device.retain_freed_memory` buys: train steps with glibc malloc's defaults and with freed
memory retained, each setting in its own fresh process (the setting is process-wide and cannot be undone),
processes alternating default / retained for `--pairs` pairs. Printed as JSON.

    python benchmarks/bench_malloc.py [--pairs 2] [--threads 1] [--steps 3]

Each process times our compiled bf16 train step (as bench_transformer.py --compiled) and, with
FLEXVAR_OFFICIAL_DIR set, the official bf16 train step beside it: CPU seconds per step (median of three
blocks of `--steps` steps after three warm-up steps) and minor page faults per step.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def one_process(mode: str, threads: int, steps: int) -> dict:
    """Build the steps in this process with `mode` ('default' or 'retain') and time them."""
    import torch  # noqa: F401  (imported before the setting, as in a stage)

    from benchmarks.bench_transformer import official, ours
    from benchmarks.side_by_side import official_modules, set_threads
    from flexvar.device import retain_freed_memory

    set_threads(threads)
    if mode == "retain" and not retain_freed_memory():
        return {"mode": mode, "error": "retain_freed_memory is a no-op here (not glibc)"}
    mine = ours(8, compiled=True)
    fns = {"ours bf16 compiled": mine["train_step"]}
    mods, _ = official_modules()
    if mods is not None:
        fns["official bf16"] = official(mods, 8, mine["inputs"])["train_step bf16"]
    for f in fns.values():
        for _ in range(3):
            f()
    secs, flt = {k: [] for k in fns}, {k: 0 for k in fns}
    for _ in range(3):
        for k, f in fns.items():
            f0, t = faults(), time.process_time()
            for _ in range(steps):
                f()
            secs[k].append((time.process_time() - t) / steps)
            flt[k] += (faults() - f0) / (3 * steps)
    return {"mode": mode, **{k: {"cpu_s": round(statistics.median(v), 4), "faults_per_step": round(flt[k])}
                             for k, v in secs.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2, help="default/retained process pairs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block (three blocks)")
    ap.add_argument("--one", choices=["default", "retain"], help=argparse.SUPPRESS)   # a child process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_process(args.one, args.threads, args.steps)))
        return 0
    runs = []
    for pair in range(args.pairs):
        for mode in ("default", "retain"):
            cmd = [sys.executable, __file__, "--one", mode, "--threads", str(args.threads), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"[bench_malloc] pair {pair + 1}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    print(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
