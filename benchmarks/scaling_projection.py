"""Scaling on paper: projected DDP / FSDP step time and efficiency of d16/d20/d24 on 8, 16, 32 GPUs.

    python benchmarks/scaling_projection.py [--gpu-json docs/gpu/gpu_d16.json] [--mfu 0.40]

Inputs: the measured single-GPU d16 step (H200, eager SDPA, batch 32 per GPU, from `--gpu-json`) and
the gradient size (fp32, 4 bytes x parameters). d20/d24 compute time = d16's x their parameter ratio
(same MFU; parameters from the model built on the meta device). Communication is a ring with NCCL bus
bandwidth B: all-reduce 2(N-1)/N x S / B, all-gather or reduce-scatter (N-1)/N x S / B. Named
interconnect assumptions (`BUS`): within one 8-GPU node NVLink at 360 GB/s bus bandwidth; across nodes
either 8 x 400 Gb/s InfiniBand NDR per node (180 GB/s) or one 400 Gb/s NIC per node (45 GB/s).
Overlap model: DDP all-reduces buckets during backward (2/3 of the compute), so only what exceeds
the backward plus the last 25 MB bucket is exposed; the removed hand-written all-reduce ran after
backward (no overlap). FSDP (fully_shard per block, fp32 parameters, reshard after forward) all-gathers
the parameters in forward and again in backward and reduce-scatters gradients, each prefetched one
block ahead, so exposed = what exceeds forward / backward compute plus the first block's gathers.
Perfect overlap is an upper bound (NCCL kernels also take a few percent of the SMs).
Prints markdown tables (weak scaling: batch 32 per GPU, global batch 32 N).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexvar.config import TransformerConfig  # noqa: E402
from flexvar.transformer.model import build_flexvar  # noqa: E402

BUS = {"NVLink node (360 GB/s)": 360e9, "8x400G NDR/node (180 GB/s)": 180e9, "1x400G/node (45 GB/s)": 45e9}
BUCKET_BYTES = 25e6
GPUS = (8, 16, 32)


def bus_for(n: int, inter: str) -> float:
    return BUS["NVLink node (360 GB/s)"] if n <= 8 else BUS[inter]


def project(params: float, t_compute: float, n: int, bus: float) -> dict:
    grads = 4 * params
    fwd, bwd = t_compute / 3, 2 * t_compute / 3
    all_reduce = 2 * (n - 1) / n * grads / bus
    gather = (n - 1) / n * grads / bus
    ddp = t_compute + max(0.0, all_reduce - bwd) + BUCKET_BYTES / bus
    fsdp = t_compute + max(0.0, gather - fwd) + max(0.0, 2 * gather - bwd) + 2 * grads / 16 / bus
    return {"grads_gb": grads / 1e9, "compute_ms": 1e3 * t_compute, "all_reduce_ms": 1e3 * all_reduce,
            "no_overlap_eff": t_compute / (t_compute + all_reduce), "ddp_ms": 1e3 * ddp, "ddp_eff": t_compute / ddp,
            "fsdp_ms": 1e3 * fsdp, "fsdp_eff": t_compute / fsdp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-json", default="docs/gpu/gpu_d16.json")
    ap.add_argument("--mfu", type=float, default=0.40, help="also project at this MFU (the issue's target)")
    args = ap.parse_args()
    gpu = json.loads(Path(args.gpu_json).read_text())
    row32 = next(r for r in gpu["train"] if r["batch"] == 32 and not r.get("compile"))
    params = {f"d{d}": build_flexvar(TransformerConfig(depth=d), 4096, 32, 1000, 16, device="meta").num_params()
              for d in (16, 20, 24)}
    for label, speed in ((f"measured eager step ({row32['mfu_vs_datasheet']:.1%} MFU)", 1.0),
                         (f"at {args.mfu:.0%} MFU", row32["mfu_vs_datasheet"] / args.mfu)):
        for inter in list(BUS)[1:]:
            print(f"\n{label}; across nodes {inter}\n")
            print("| model | GPUs | grads fp32 GB | compute ms | all-reduce ms | no-overlap eff | DDP ms | DDP eff "
                  "| FSDP ms | FSDP eff |\n|---|---|---|---|---|---|---|---|---|---|")
            for name, p in params.items():
                t = row32["s_per_step"] * p / params["d16"] * speed
                for n in GPUS:
                    r = project(p, t, n, bus_for(n, inter))
                    print(f"| {name} | {n} | {r['grads_gb']:.2f} | {r['compute_ms']:.0f} | {r['all_reduce_ms']:.0f} "
                          f"| {r['no_overlap_eff']:.0%} | {r['ddp_ms']:.0f} | {r['ddp_eff']:.0%} | {r['fsdp_ms']:.0f} "
                          f"| {r['fsdp_eff']:.0%} |")


if __name__ == "__main__":
    main()
