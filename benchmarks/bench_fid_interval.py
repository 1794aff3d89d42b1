"""Cost of one bootstrap replicate of the FID interval (evaluate stage), before and after issue 30's fix,
side by side in one process at a realistic feature dimension; prints JSON.

    PYTHONPATH=. python -m benchmarks.bench_fid_interval [--n 50000] [--dim 2048] [--reps 2] [--threads 1]

before: the replicate as it was (rows gathered, projected onto sqrt(Σ_ref), N-row Gram, eigvalsh) =
`FrechetToReference(features[idx])`; after: `BootstrapFrechet(counts)` (draw counts, features projected
once). Features: Gaussian with a random covariance, the reference another such set's statistics. The
two replicates' values are printed too (they agree to float64 rounding).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from flexvar.evaluation.intervals import BootstrapFrechet, FrechetToReference, bootstrap_counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    mix_DD = rng.normal(size=(args.dim, args.dim)) / np.sqrt(args.dim)
    ref_DD = mix_DD @ mix_DD.T + 0.1 * np.eye(args.dim)
    feats_ND = rng.normal(size=(args.n, args.dim)) @ (mix_DD * 1.1)
    t = time.perf_counter()
    frechet = FrechetToReference(rng.normal(size=args.dim) * 0.1, ref_DD)
    ref_s = time.perf_counter() - t
    t = time.perf_counter()
    after = BootstrapFrechet(feats_ND, frechet)
    setup_s = time.perf_counter() - t
    before_s, after_s, values = [], [], []
    for counts_N, idx_N in zip(bootstrap_counts(args.n, args.reps, 0),
                               np.random.default_rng(0).integers(0, args.n, size=(args.reps, args.n))):
        t = time.perf_counter()
        b = frechet(feats_ND[idx_N])
        before_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        a = after(counts_N)
        after_s.append(time.perf_counter() - t)
        values.append((b, a))
    per_before, per_after = float(np.median(before_s)), float(np.median(after_s))
    print(json.dumps({
        "n": args.n, "dim": args.dim, "threads": args.threads, "replicates_timed": args.reps,
        "reference_sqrt_s": round(ref_s, 2), "after_setup_s (projection once)": round(setup_s, 2),
        "before_s_per_replicate": [round(x, 2) for x in before_s], "after_s_per_replicate": [round(x, 2) for x in after_s],
        "before_s_1000_replicates": round(1000 * per_before, 1),
        "after_s_1000_replicates": round(setup_s + 1000 * per_after, 1),
        "speedup": round(1000 * per_before / (setup_s + 1000 * per_after), 2),
        "values_before_after": values,
        "max_rel_diff": max(abs(a - b) / abs(b) for b, a in values)}, indent=1))


if __name__ == "__main__":
    main()
