"""GPU check of the paper's d16 preset (issue 4): train-step speed and model-FLOPs utilisation, printed as JSON.

    python benchmarks/gpu_d16.py [--batches 32 64 128] [--steps 10] [--compile] [--sample-batch 64]

Model: FlexVAR-d16 as `presets/d16.yaml` builds it (depth 16, width 1024, 16 heads, vocabulary
4096, Cvae 32, 1000 classes, 16x16 latent = 256 px), bf16 autocast, the paper's 10-step schedule
1,2,3,4,5,6,8,10,13,16 (680 tokens). A step is what `train_transformer` does: take the batch from
the latent cache, quantise it at every scale, forward, label-smoothed loss, backward, clip, AdamW.
Model FLOPs are counted by torch's FlopCounterMode on one step (matmuls and attention, forward and
backward); MFU divides the achieved FLOP/s by the H100/H200 datasheet dense bf16 peak (989 TFLOP/s)
and, separately, by a bf16 matmul measured here. `--sample-batch` also times d16 generation at
256 px (10 steps, cfg 2.5, top-k 900) with the paper tokenizer's decode.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexvar.config import TokenizerConfig, TrainTransformerConfig, TransformerConfig  # noqa: E402
from flexvar.generation.generate import generate_batch, make_generator  # noqa: E402
from flexvar.data.latent_cache import LatentSplit  # noqa: E402
from flexvar.tokenizer.quantizer import MultiScaleQuantizer  # noqa: E402
from flexvar.tokenizer.vqvae import VQVAE  # noqa: E402
from flexvar.transformer.model import FlexVAR  # noqa: E402
from flexvar.optim import make_adamw  # noqa: E402
from flexvar.transformer.training import batch_indices, forward_backward  # noqa: E402

SIDES = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
SCALES = [(s, s) for s in SIDES]
PEAK_BF16_TFLOPS = 989.0      # H100/H200 SXM datasheet, dense bf16
DEV = torch.device("cuda")       # --device cpu: a slow dry run of the script itself


def sync_time() -> float:
    if DEV.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    if DEV.type != "cuda":
        n, reps = 1024, 2
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t = sync_time()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (sync_time() - t) / 1e12


def build(compile_model: bool):
    torch.manual_seed(0)
    model = FlexVAR(TransformerConfig(depth=16), 4096, 32, 1000, pe_size=16).to(DEV).train()
    opt = make_adamw(model, TrainTransformerConfig(lr=8e-4))
    fwd = torch.compile(model) if compile_model else model
    return model, fwd, opt


def latent_cache(n: int = 1024) -> LatentSplit:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, 32, 16, 16, generator=g)
    return LatentSplit(z, torch.randint(0, 1000, (n,), generator=g), [str(i) for i in range(1000)])


def train_step(model, fwd, opt, quant, data, i: int, batch: int) -> None:
    """What train_transformer does per step (one micro-batch): forward_backward, clip, AdamW."""
    items = batch_indices(i, batch, 2 * len(data), 0)
    forward_backward(fwd, quant, data, items, SCALES, TrainTransformerConfig(precision="bf16"), prediction="gt",
                     device=DEV)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_train(batch: int, steps: int, compile_model: bool, peak_measured: float) -> dict:
    model, fwd, opt = build(compile_model)
    quant = MultiScaleQuantizer(4096, 32).to(DEV)
    data = latent_cache()
    with FlopCounterMode(display=False) as fc:
        train_step(model, model, opt, quant, data, 0, batch)
    flops = fc.get_total_flops()
    t0 = sync_time()
    for i in range(3):                                   # warm-up (and compilation)
        train_step(model, fwd, opt, quant, data, i, batch)
    warm_s = sync_time() - t0
    times = []
    for i in range(steps):
        t = sync_time()
        train_step(model, fwd, opt, quant, data, 3 + i, batch)
        times.append(sync_time() - t)
    s = statistics.median(times)
    out = {"batch": batch, "compile": compile_model, "s_per_step": round(s, 4), "images_per_s": round(batch / s, 1),
           "tokens_per_s": round(batch * sum(h * w for h, w in SCALES) / s), "model_tflop_per_step": round(flops / 1e12, 2),
           "achieved_tflops": round(flops / s / 1e12, 1), "mfu_vs_datasheet": round(flops / s / 1e12 / PEAK_BF16_TFLOPS, 3),
           "mfu_vs_measured_matmul": round(flops / s / 1e12 / peak_measured, 3), "warmup_s": round(warm_s, 1),
           "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if DEV.type == "cuda" else None}
    del model, fwd, opt
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def bench_sample(batch: int) -> dict:
    torch.manual_seed(0)
    model = FlexVAR(TransformerConfig(depth=16), 4096, 32, 1000, pe_size=16).to(DEV).eval()
    vq = VQVAE(TokenizerConfig(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256,
                               codebook_dim=32, codebook_size=4096)).to(DEV).eval()
    labels = torch.arange(batch) * 37 % 1000
    gen = make_generator(0, DEV)

    def run(decode: bool):
        return generate_batch(model, vq, labels, SCALES, cfg=2.5, top_k=900, top_p=0.96, generator=gen,
                              decode=decode, precision="bf16")
    out = {"batch": batch, "image_px": 256, "steps": len(SCALES)}
    for decode in (False, True):
        run(decode)
        t = sync_time()
        res = run(decode)
        s = sync_time() - t
        out["end_to_end" if decode else "no_decode"] = {"s_per_batch": round(s, 3), "images_per_s": round(batch / s, 1)}
    out["image_shape"] = list(res.images.shape)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile at the first batch size")
    ap.add_argument("--sample-batch", type=int, default=64, help="0 skips the sampling timing")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_d16.py needs a CUDA device (or --device cpu for a dry run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_tflops()
    n_params = sum(p.numel() for p in FlexVAR(TransformerConfig(depth=16), 4096, 32, 1000, pe_size=16).parameters())
    report = {"gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "torch": torch.__version__, "d16_params_M": round(n_params / 1e6, 1),
              "schedule": SIDES, "tokens": sum(h * w for h, w in SCALES), "matmul_bf16_tflops_measured": round(peak, 1),
              "train": []}
    for batch in args.batches:
        report["train"].append(bench_train(batch, args.steps, False, peak))
        print(json.dumps(report["train"][-1]), file=sys.stderr, flush=True)
    if args.compile:
        report["train"].append(bench_train(args.batches[0], args.steps, True, peak))
        print(json.dumps(report["train"][-1]), file=sys.stderr, flush=True)
    if args.sample_batch:
        report["sample"] = bench_sample(args.sample_batch)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
