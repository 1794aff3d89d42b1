"""Scaling on paper: projected DDP / FSDP step time and efficiency of d16/d20/d24 on 8, 16, 32 GPUs,
and the host memory of the d16 preset on ImageNet-1k per stage and per worker.

    python -m benchmarks.scaling_projection [--gpu-json docs/gpu/gpu_d16.json] [--mfu 0.40]
        [--memory-json docs/scale/scale_memory_w1.json --memory-dp-json docs/scale/scale_memory_w2.json
         --loader-json docs/scale/loader_probe.json]

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

The paper's run (`paper_run`): the d16 preset's `train_transformer.steps` (180 epochs of ImageNet-1k at
the global batch 768) on one node of 8 GPUs, each taking micro-batch 768 / 8 = 96 per step (no
accumulation). Measured: the H200's eager d16 step at batches 64 and 128 (images/s interpolated to 96)
and its 50,000-image sampling rate. Assumed: an H100 SXM runs the compute-bound d16 step at the H200's
rate (same 989 TFLOP/s bf16 datasheet), with a 15% bracket for H100's 3.35 vs 4.8 TB/s memory
bandwidth; the DDP all-reduce of `project` over NVLink; no time for data loading (the latent cache is
read from page cache), evaluation or checkpoints.

Host memory (`--memory-json`, from benchmarks/scale_memory.py at its largest N): per process, the
measured private memory (Pss_Anon: no shared libraries, no page cache) of the stage's main process,
which the benchmark showed independent of N, and what each DataLoader worker adds (its Private_Dirty
with 8 workers, `--loader-json`), plus what grows with the d16
preset rather than with the dataset: the models built on the host before they move to the GPU (fp32,
4 bytes x parameters, counted from the preset on the meta device, minus the benchmark's tiny models)
and the O(batch) data in flight at 256 px (`D16_DATA`). A training stage runs 8 workers per node
(one per GPU), each with `data.num_workers` = 8 DataLoader workers; the per-worker base comes from the
2-worker run (`--memory-dp-json`). The latent cache and the prepared Arrow files are memory-mapped and
released after each read: they live in the shared, evictable page cache, once per node, never per worker.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


import torch
import yaml

from flexvar.config import Params, TransformerConfig
from flexvar.presets import PRESETS_DIR, deep_merge
from flexvar.tokenizer.vqvae import VQVAE
from flexvar.transformer.model import build_flexvar

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


MB = 2 ** 20
IMAGENET = dict(n=1_281_167, px=256, png_kb=120, jpeg_kb=110, gpus_per_node=8, fid_samples=50_000,
                inception_dim=2048)


def d16_params() -> Params:
    data = deep_merge(Params().model_dump(mode="json"), yaml.safe_load((PRESETS_DIR / "d16.yaml").read_text()))
    return Params.model_validate(data)


VGG16_PARAMS = 138_357_544   # torchvision's VGG16: the perceptual loss reads the whole file on the host


def host_model_bytes(p: Params) -> dict[str, float]:
    """fp32 bytes of the models as built on the host (meta device: shapes only) before they move to
    the GPU: tokenizer, transformer, and for tokenizer training the discriminator and the VGG16 file."""
    from flexvar.tokenizer.discriminator import PatchDiscriminator

    with torch.device("meta"):
        tok = sum(t.numel() for t in VQVAE(p.tokenizer).parameters())
        disc = sum(t.numel() for t in PatchDiscriminator().parameters()) if p.train_tokenizer.gan_weight > 0 else 0
    depth = p.variants.depths[0]                                      # the preset's model: d16
    tr = build_flexvar(p.transformer.model_copy(update={"depth": depth}), p.tokenizer.codebook_size, p.tokenizer.codebook_dim, 1000,
                       p.transformer.pos_embed_size, device="meta").num_params()
    vgg = VGG16_PARAMS if p.train_tokenizer.perceptual_weight > 0 else 0
    return {"tokenizer": 4.0 * tok, "transformer": 4.0 * tr, "discriminator": 4.0 * disc, "vgg16": 4.0 * vgg}


def d16_data_bytes(p: Params) -> dict[str, tuple[float, str]]:
    """O(batch) bytes in flight per process at 256 px, and what they are."""
    img, w, nw = 3 * IMAGENET["px"] ** 2, IMAGENET["gpus_per_node"], p.data.num_workers
    lat = 2 * p.tokenizer.codebook_dim * p.latent_size ** 2 * 4
    tok_b, tr_b, s_b = p.train_tokenizer.batch_size // w, p.train_transformer.batch_size // w, p.sample.batch_size
    return {
        "prepare": (1000 * IMAGENET["png_kb"] * 1024 + nw * 64 * (IMAGENET["jpeg_kb"] + IMAGENET["png_kb"]) * 1024,
                    "Arrow writer batch of 1000 PNGs + the task window (workers x 64: JPEG in, PNG out)"),
        "train_tokenizer": (2 * nw * tok_b * img + tok_b * img * 4 * 4,
                            f"{2 * nw} prefetched uint8 batches of {tok_b} + float copies of one"),
        "extract_latents": (2 * nw * 64 * img + 64 * (2 * img * 4 + lat), "prefetched batches of 64 + one float batch"),
        "train_transformer": (tr_b * lat * 4, f"the worker's {tr_b} latents gathered from the maps (x4: copies)"),
        "train_feature_net": (2 * nw * 64 * img + 64 * img * 4 * 2, "prefetched batches of 64 + float copies"),
        "reference_stats": (64 * img * 5 + 50_000 * IMAGENET["inception_dim"] * 8,
                            "a batch + 50k x 2048 float64 reference features"),
        "sample": (s_b * img * 9, f"one batch of {s_b}: uint8 + float images, CFG doubles it"),
        "evaluate": (64 * img * 5 + IMAGENET["fid_samples"] * IMAGENET["inception_dim"] * 8,
                     "a batch + 50k x 2048 float64 features (KID / precision-recall need them all)"),
    }


def private_mb(row: dict, main: bool) -> float:
    """Peak private MB of the stage's main process (main: its Pss_Anon, which includes its share of the
    pages a forked DataLoader worker still shares with it), or what one DataLoader worker adds: its
    Private_Dirty (own allocations + copied-on-write pages) where measured, else its Pss_Anon (an
    upper bound: half of the pages it shares with its parent)."""
    procs = row.get("per_process", [])
    top = [r for r in procs if r["ppid"] not in {q["pid"] for q in procs}]
    root = top[0]["pid"] if top else None
    kids = [r.get("peak_private_dirty_mb", r["peak_private_mb"]) for r in procs if r["ppid"] == root]
    if main:
        return next((r["peak_private_mb"] for r in procs if r["pid"] == root), row["peak_tree_private_mb"])
    return max(kids, default=0.0)


MODEL_OF = {"train_tokenizer": ("tokenizer", "discriminator", "vgg16"), "extract_latents": ("tokenizer",), "sample": ("tokenizer", "transformer"),
            "train_transformer": ("transformer",)}


def host_memory(w1: dict, w2: dict | None, probe: dict | None = None) -> list[dict]:
    """Per stage: MB per process (main / each training worker), DataLoader workers, total per node.
    `probe` (scale_memory.py --loader-probe 8): what one DataLoader worker adds, measured with 8."""
    p = d16_params()
    models, data = host_model_bytes(p), d16_data_bytes(p)
    n_big = max(w1, key=int)
    rows = []
    for stage, (data_b, what) in data.items():
        m = w1[n_big].get(stage)
        if m is None:
            continue
        workers = IMAGENET["gpus_per_node"] if stage in ("train_tokenizer", "train_transformer") else 1
        base = private_mb(m, main=True)
        dp = w2[max(w2, key=int)].get(stage) if w2 else None      # the 2-worker run at its largest N
        if workers > 1 and dp and dp.get("train_workers"):
            base = max(w["peak_private_mb"] for w in dp["train_workers"])
        loaders = p.data.num_workers if stage not in ("train_transformer", "sample", "evaluate") else 0
        per_loader = max(w["private_dirty_mb"] for w in probe["per_worker"]) if probe else private_mb(m, main=False)
        loader_mb = per_loader if loaders else 0.0
        model_mb = sum(models[k] for k in MODEL_OF.get(stage, ())) / MB
        proc = base + model_mb + data_b / MB
        rows.append({"stage": stage, "processes_per_node": workers, "measured_base_mb": round(base),
                     "model_mb": round(model_mb), "data_mb": round(data_b / MB), "per_process_mb": round(proc),
                     "dataloader_workers": loaders, "per_dataloader_worker_mb": round(loader_mb),
                     "node_mb": round(workers * (proc + loaders * loader_mb)), "data_term": what})
    return rows


def print_host_memory(rows: list[dict], p: Params) -> None:
    n, lat = IMAGENET["n"], 2 * p.tokenizer.codebook_dim * p.latent_size ** 2
    print(f"\nHost memory, d16 preset on ImageNet-1k ({IMAGENET['gpus_per_node']} GPUs per node, "
          f"data.num_workers {p.data.num_workers}); private memory (no shared libraries, no page cache)\n")
    print("| stage | processes / node | measured base MB | + models MB | + data MB | per process MB "
          "| DataLoader workers x MB | per node GB | data in flight |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['processes_per_node']} | {r['measured_base_mb']} | {r['model_mb']} | {r['data_mb']} "
              f"| {r['per_process_mb']} | {r['dataloader_workers']} x {r['per_dataloader_worker_mb']} "
              f"| {r['node_mb'] / 1024:.1f} | {r['data_term']} |")
    print(f"\nShared page cache (evictable, once per node, not per worker): prepared Arrow ~{n * IMAGENET['png_kb'] / 2**20:.0f}"
          f" GiB of PNG; latent cache {n * lat * 4 / 2**30:.1f} GiB float32 ({n * lat * 2 / 2**30:.1f} GiB float16)."
          f" Index arrays per process: labels int64 {n * 8 / MB:.0f} MB, the epoch permutation int32 "
          f"{2 * n * 4 / MB:.0f} MB (2.56 M image + flip keys).")


def paper_run(gpu: dict, params_d16: float, p: Params, mfu: float, gpus: int = 8, h100_slower: float = 1.15) -> list[dict]:
    """Hours of the d16 preset's training on `gpus` GPUs: measured eager rate and `mfu`, H100 = H200 .. +15%."""
    t = p.train_transformer
    per_gpu = t.batch_size // gpus
    eager = sorted((r for r in gpu["train"] if not r.get("compile")), key=lambda r: r["batch"])
    lo, hi = max((r for r in eager if r["batch"] <= per_gpu), key=lambda r: r["batch"]), \
        min((r for r in eager if r["batch"] >= per_gpu), key=lambda r: r["batch"])
    w = 0.0 if hi["batch"] == lo["batch"] else (per_gpu - lo["batch"]) / (hi["batch"] - lo["batch"])
    rate = lo["images_per_s"] + w * (hi["images_per_s"] - lo["images_per_s"])     # images/s per GPU, eager
    mfu_eager = lo["mfu_vs_datasheet"] + w * (hi["mfu_vs_datasheet"] - lo["mfu_vs_datasheet"])
    sample_min = IMAGENET["fid_samples"] / gpu["sample"]["end_to_end"]["images_per_s"] / gpus / 60
    rows = []
    for label, speed in ((f"measured eager ({mfu_eager:.1%} MFU)", 1.0), (f"at {mfu:.0%} MFU", mfu_eager / mfu)):
        compute = per_gpu / rate * speed
        step = project(params_d16, compute, gpus, bus_for(gpus, list(BUS)[1]))["ddp_ms"] / 1e3
        hours = t.steps * step / 3600
        rows.append({"setting": label, "per_gpu_batch": per_gpu, "step_s": step, "steps": t.steps,
                     "train_h": hours, "train_h_h100_slow": hours * h100_slower, "sample_50k_min": sample_min})
    return rows


def print_paper_run(rows: list[dict], gpus: int = 8) -> None:
    print(f"\nd16 preset, 180 epochs of ImageNet-1k on {gpus} GPUs (global batch 768, {rows[0]['per_gpu_batch']} per GPU, "
          f"{rows[0]['steps']:,} steps; H100 = H200 compute rate .. +15%)\n")
    print("| setting | step s | training hours (H200 rate) | training hours (H100, +15%) | 50,000 samples, minutes |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['step_s']:.3f} | {r['train_h']:.1f} | {r['train_h_h100_slow']:.1f} "
              f"| {r['sample_50k_min']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-json", default="docs/gpu/gpu_d16.json")
    ap.add_argument("--mfu", type=float, default=0.40, help="also project at this MFU (the issue's target)")
    ap.add_argument("--memory-json", default="docs/scale/scale_memory_w1.json",
                    help="benchmarks/scale_memory.py output, 1 training worker ('' to skip the memory table)")
    ap.add_argument("--memory-dp-json", default="docs/scale/scale_memory_w2.json",
                    help="benchmarks/scale_memory.py --train-workers 2 output (per-worker base)")
    ap.add_argument("--loader-json", default="docs/scale/loader_probe.json",
                    help="benchmarks/scale_memory.py --loader-probe 8 output (what one DataLoader worker adds)")
    args = ap.parse_args()
    if args.memory_json:
        w2 = json.loads(Path(args.memory_dp_json).read_text()) if Path(args.memory_dp_json).is_file() else None
        probe = json.loads(Path(args.loader_json).read_text()) if Path(args.loader_json).is_file() else None
        print_host_memory(host_memory(json.loads(Path(args.memory_json).read_text()), w2, probe), d16_params())
    gpu = json.loads(Path(args.gpu_json).read_text())
    row32 = next(r for r in gpu["train"] if r["batch"] == 32 and not r.get("compile"))
    params = {f"d{d}": build_flexvar(TransformerConfig(depth=d), 4096, 32, 1000, 16, device="meta").num_params()
              for d in (16, 20, 24)}
    print_paper_run(paper_run(gpu, params["d16"], d16_params(), args.mfu))
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
