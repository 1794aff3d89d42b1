"""What `pipeline.env.retain_freed_memory` buys: page faults and CPU time per step with glibc malloc's
defaults and with freed memory retained, each setting in its own fresh process (the setting is
process-wide and cannot be undone), processes alternating default / retained for `--pairs` pairs.
Printed as JSON.

    python -m benchmarks.bench_malloc [--pairs 2] [--threads 1] [--what step train tokenizer sample]
    python -m benchmarks.bench_malloc --what step        # page faults per step in seconds

Workloads (`--what`), each timed as ours and, with FLEXVAR_OFFICIAL_DIR set, the official code under
bf16 autocast beside it, in the settings of the side-by-side benchmarks:
  - `step`: a small FlexVAR's teacher-forced forward and backward (depth 2, width 128, a 4096-way head:
    ~11 MB of logits per step), fp32 -- ours only, seconds to run;
  - `train`: our compiled bf16 train step and the official one (bench_transformer --compiled);
  - `tokenizer`: the VQ-16 train steps at 96 px, batch 1 (bench_tokenizer);
  - `sample`: sampling with decode (bench_sample).
Per workload and process: CPU seconds per call (median of three timed blocks after a warm-up block) and
minor page faults per call. The number of faults depends on the machine (its glibc, its page size, what
else the process allocated), so it is measured here, never asserted in a test.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]   # the project: the children run `-m benchmarks.bench_malloc` there
WORKLOADS = ("step", "train", "tokenizer", "sample")


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def small_step():
    """One teacher-forced forward and backward of a small FlexVAR (fp32, 4096-way head)."""
    from flexvar.config import TransformerConfig
    from flexvar.transformer.model import FlexVAR

    torch.manual_seed(0)
    model = FlexVAR(TransformerConfig(depth=2, width=128, heads=2), vocab_size=4096, codebook_dim=8,
                    num_classes=10, pe_size=8)
    scales = [(1, 1), (2, 2), (4, 4), (8, 8)]
    L = sum(h * w for h, w in scales)                     # targets: every scale; inputs: all but the first
    x_BLC, labels_B, tgt_BL = torch.randn(8, L - 1, 8), torch.arange(8), torch.randint(0, 4096, (8, L))

    def step():
        logits_BLV = model(labels_B, x_BLC, scales)
        torch.nn.functional.cross_entropy(logits_BLV.flatten(0, 1), tgt_BL.flatten()).backward()
        model.zero_grad(set_to_none=True)
    return step


def callables(what: str) -> tuple[dict, int]:
    """({name: one call}, calls per block): ours and the official code's, for `what`."""
    from benchmarks import bench_sample, bench_tokenizer, bench_transformer
    from benchmarks.side_by_side import official_modules

    if what == "step":
        return {"ours fp32 small step": small_step()}, 3
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


def summary(runs: list[dict]) -> dict:
    """Per workload and code: page faults and CPU seconds per call under each setting, means over the
    pairs, and the retained setting's share of the default's faults."""
    out = {}
    for what in WORKLOADS:
        for name in {k for r in runs for k in r.get(what, {})}:
            row = {}
            for mode in ("default", "retain"):
                vals = [r[what][name] for r in runs if r["mode"] == mode and name in r.get(what, {})]
                if vals:
                    row[mode] = {k: round(sum(v[k] for v in vals) / len(vals), 4) for k in ("faults_per_call", "cpu_s")}
            if len(row) == 2 and row["default"]["faults_per_call"]:
                row["retained_faults_share"] = round(row["retain"]["faults_per_call"] / row["default"]["faults_per_call"], 3)
            out[f"{what}: {name}"] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2, help="default/retained process pairs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--what", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--one", choices=["default", "retain"], help=argparse.SUPPRESS)   # a child process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_process(args.one, args.threads, args.what)))
        return 0
    runs = []
    for pair in range(args.pairs):
        for mode in ("default", "retain"):
            cmd = [sys.executable, "-m", "benchmarks.bench_malloc", "--one", mode, "--threads", str(args.threads),
                   "--what", *args.what]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"bench_malloc: the {mode} process failed:\n{proc.stderr[-3000:]}")
            out = proc.stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"[bench_malloc] pair {pair + 1}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    print(json.dumps({"summary": summary(runs), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
