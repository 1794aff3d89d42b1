"""What `pipeline.env.retain_freed_memory` buys: ours and the official code with glibc malloc's defaults
and with freed memory retained, each setting in its own fresh process (the setting is process-wide and
cannot be undone), processes alternating default / retained for `--pairs` pairs. Printed as JSON.

    python benchmarks/bench_malloc.py [--pairs 2] [--threads 1] [--what train tokenizer sample]

Each process times, for each of `--what`, ours and (with FLEXVAR_OFFICIAL_DIR set) the official code
under bf16 autocast in the settings of the side-by-side benchmarks: `train` our compiled bf16 train step
and the official one (bench_transformer.py --compiled), `tokenizer` the VQ-16 train steps at 96 px, batch 1
(bench_tokenizer.py), `sample` sampling with decode (bench_sample.py). CPU seconds per call (median of
three timed blocks after warm-up) and minor page faults per call.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def callables(what: str) -> tuple[dict, int]:
    """({name: one call}, calls per block): ours and the official code's, for `what`."""
    from benchmarks import bench_sample, bench_tokenizer, bench_transformer
    from benchmarks.side_by_side import official_modules

    mods, _ = official_modules()
    if what == "train":
        mine = bench_transformer.ours(8, compiled=True)
        fns = {"ours bf16 compiled": mine["train_step"]}
        if mods is not None:
            fns["official bf16"] = bench_transformer.official(mods, 8, mine["inputs"])["train_step bf16"]
        return fns, 3
    if what == "tokenizer":
        fns = {"ours bf16": bench_tokenizer.ours(96, 1)["train"]}
        if mods is not None:
            fns["official bf16"] = bench_tokenizer.official(mods, 96, 1)["train bf16"]
        return fns, 2
    model, vq = bench_sample.build(torch.device("cpu"))
    fns = {"ours bf16": bench_sample.sampler(model, vq, decode=True)}
    if mods is not None:
        fns["official bf16"] = bench_sample.official_samplers(mods)[("bf16", True)]
    return fns, 1


def one_process(mode: str, threads: int, whats: list[str]) -> dict:
    """Build the calls in this process with `mode` ('default' or 'retain') and time them with
    side_by_side.interleave (one warm-up block, three timed blocks of calls), counting page faults per block."""
    from benchmarks.side_by_side import interleave, set_threads
    from pipeline.env import retain_freed_memory

    set_threads(threads)
    if mode == "retain" and not retain_freed_memory():
        return {"mode": mode, "error": "retain_freed_memory is a no-op here (not glibc)"}
    out = {"mode": mode}
    for what in whats:
        fns, per_block = callables(what)
        block_faults = {k: [] for k in fns}

        def block(name, fn):
            def run():
                f0 = faults()
                for _ in range(per_block):
                    fn()
                block_faults[name].append(faults() - f0)
            return run
        res = interleave({k: block(k, f) for k, f in fns.items()}, rounds=3, warmup=1)
        out[what] = {k: {"cpu_s": round(r["cpu_median_s"] / per_block, 4),
                         "faults_per_call": round(sum(block_faults[k][-3:]) / (3 * per_block))}
                     for k, r in res.items()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2, help="default/retained process pairs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--what", nargs="+", default=["train", "tokenizer", "sample"], choices=["train", "tokenizer", "sample"])
    ap.add_argument("--one", choices=["default", "retain"], help=argparse.SUPPRESS)   # a child process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_process(args.one, args.threads, args.what)))
        return 0
    runs = []
    for pair in range(args.pairs):
        for mode in ("default", "retain"):
            cmd = [sys.executable, __file__, "--one", mode, "--threads", str(args.threads), "--what", *args.what]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"[bench_malloc] pair {pair + 1}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    print(json.dumps({"runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
