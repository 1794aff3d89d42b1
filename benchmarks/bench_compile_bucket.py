"""The compiled train step over random schedules: sequences padded to a length bucket (static shapes,
one graph per bucket) against one graph with a dynamic length (`compile_bucket: 0`), printed as JSON.

    python benchmarks/bench_compile_bucket.py [--schedules 40] [--buckets 16 0] [--threads 1]

Same model and batch as bench_transformer.py (d6 / 384 / 6 heads, V 4096, batch 8 on an 8x8 latent);
the schedules are drawn by the trainer's `ScheduleSampler` with the default `ScheduleConfig` (lengths
78..155 tokens). One compiled model per bucket setting (`bench_transformer.ours`). Every schedule is
first run once by each model (compiling every graph it needs, untimed); then each schedule is timed on
every model in turn (one full train step: the schedule's inputs quantised from the same cached latents,
forward, loss, backward, clip, AdamW), so a change in the machine's speed hits every setting alike.
Reports each setting's total and median CPU seconds and the ratio of totals.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.bench_transformer as BT  # noqa: E402
from benchmarks.side_by_side import add_threads_arg, machine, setup_process  # noqa: E402
from flexvar.config import ScheduleConfig  # noqa: E402
from flexvar.schedules import ScheduleSampler, num_tokens  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedules", type=int, default=40, help="random schedules timed (each on every setting)")
    ap.add_argument("--buckets", type=int, nargs="+", default=[16, 0], help="compile_bucket settings (0 = dynamic)")
    ap.add_argument("--batch", type=int, default=8)
    add_threads_arg(ap)
    args = ap.parse_args(argv)
    setup_process(args)
    torch._dynamo.config.cache_size_limit = 64           # one graph per bucket and model
    sampler = ScheduleSampler(ScheduleConfig(), (8, 8), 0)
    schedules = [sampler.sample() for _ in range(args.schedules)]
    steps = {b: BT.ours(args.batch, compiled=True, bucket=b)["step_on"] for b in args.buckets}
    out = {"config": {"batch": args.batch, "schedules": args.schedules,
                      "lengths": sorted({num_tokens(s) for s in schedules})}, "machine": machine()}
    for scales in schedules:                              # compile every graph, untimed
        for step in steps.values():
            step(scales)
    cpu = {b: [] for b in steps}
    for scales in schedules:
        for b, step in steps.items():
            t = time.process_time()
            step(scales)
            cpu[b].append(time.process_time() - t)
    name = {b: f"bucket {b}" if b else "dynamic" for b in steps}
    out["results"] = {name[b]: {"total_cpu_s": round(sum(c), 3), "median_cpu_s": round(statistics.median(c), 4)}
                      for b, c in cpu.items()}
    first = args.buckets[0]
    out["total_vs_first"] = {name[b]: f"{sum(cpu[first]) / sum(cpu[b]):.3f}x" for b in args.buckets[1:]}
    out["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
