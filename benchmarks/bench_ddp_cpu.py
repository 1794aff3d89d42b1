"""CPU data parallelism: the 2-worker gloo DDP (or FSDP2) training step vs the 1-worker step at the same global batch.

    python benchmarks/bench_ddp_cpu.py [--depth 2] [--batch 16] [--steps 8] [--parallelism ddp|fsdp]

Each worker is a process with 1 torch thread; the step is the library's (forward_backward on this
worker's half of the global batch, gradient all-reduce through DistributedDataParallel's buckets during
backward, clip, AdamW), random schedules from the same seeded sampler in every run. Printed as JSON:
median seconds per step of 1 worker x 1 thread, 1 worker x N threads, N workers x 1 thread, the speedup
of N workers over 1 worker (same global batch) and the per-step loss difference between them.
On a shared machine the figures are noisy; the ratio is what to read.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexvar import distributed  # noqa: E402
from flexvar.config import ScheduleConfig, TrainTransformerConfig, TransformerConfig  # noqa: E402
from flexvar.data.latent_cache import LatentSplit  # noqa: E402
from flexvar.tokenizer.quantizer import MultiScaleQuantizer  # noqa: E402
from flexvar.transformer.model import FlexVAR  # noqa: E402
from flexvar.schedules import ScheduleSampler  # noqa: E402
from flexvar.optim import make_adamw  # noqa: E402
from flexvar.transformer.training import batch_indices, forward_backward  # noqa: E402

N_SIDE, CVAE, VOCAB, CLASSES = 8, 8, 256, 10


def run(args, out: Path, threads: int) -> None:
    """Time args.steps training steps (after 2 warm-up steps) in this process; rank 0 writes the figures."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = LatentSplit(torch.randn(256, 2, CVAE, N_SIDE, N_SIDE, generator=g), torch.randint(0, CLASSES, (256,), generator=g),
                       [str(i) for i in range(CLASSES)])
    quant = MultiScaleQuantizer(VOCAB, CVAE)
    model = FlexVAR(TransformerConfig(depth=args.depth, drop_path_rate=0.0, class_dropout=0.0), VOCAB, CVAE, CLASSES,
                    pe_size=N_SIDE)
    cfg = TrainTransformerConfig(batch_size=args.batch, precision="fp32")
    net = distributed.wrap(model, args.parallelism, torch.device("cpu"), shard_units=model.blocks)
    opt = make_adamw(model, cfg)
    sampler = ScheduleSampler(ScheduleConfig(), (N_SIDE, N_SIDE), 0)
    times, losses = [], []
    for i in range(args.steps + 2):
        scales = sampler.sample()
        t = time.perf_counter()
        items = distributed.local_part(batch_indices(i, args.batch, 2 * len(data), 0))
        loss, _ = forward_backward(net, quant, data, items, scales, cfg, prediction="gt", device=torch.device("cpu"))
        distributed.clipped_step(opt, model.parameters(), 1.0)
        opt.zero_grad(set_to_none=True)
        losses.append(distributed.mean_across(loss))
        times.append(time.perf_counter() - t)
    if distributed.is_main():
        out.write_text(json.dumps({"s_per_step": statistics.median(times[2:]), "losses": losses}))


def worker(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run(args, Path(out), threads=1)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="global batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parallelism", choices=["ddp", "fsdp"], default="ddp")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for name, threads in (("one_worker_1thread", 1), (f"one_worker_{args.workers}threads", args.workers)):
            run(args, Path(tmp) / name, threads)
            res[name] = json.loads((Path(tmp) / name).read_text())
        mp.spawn(worker, args=(args.workers, 29500 + os.getpid() % 1000, args, str(Path(tmp) / "multi")),
                 nprocs=args.workers)
        res["multi"] = json.loads((Path(tmp) / "multi").read_text())
    one, multi = res["one_worker_1thread"], res["multi"]
    report = {"parallelism": args.parallelism, "workers": args.workers, "depth": args.depth,
              "global_batch": args.batch, "steps": args.steps, "cpus": os.cpu_count(),
              **{f"{k}_s_per_step": round(v["s_per_step"], 4) for k, v in res.items() if k != "multi"},
              f"{args.workers}_workers_1thread_s_per_step": round(multi["s_per_step"], 4),
              "speedup_vs_one_worker_1thread": round(one["s_per_step"] / multi["s_per_step"], 2),
              "max_abs_loss_diff_vs_one_worker": max(abs(a - b) for a, b in zip(one["losses"], multi["losses"]))}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
