"""GPU check of the paper's d16 preset (issues 4, 17): train-step speed and model-FLOPs utilisation, printed as JSON.

    python -m benchmarks.gpu_d16 [--batches 32 64 128] [--steps 10] [--attention sdpa flex] [--compile-modes 0 1]
                                 [--random-schedules 50] [--time-limit 480] [--out gpu_d16.json] [--sample-batch 64]

Model: FlexVAR-d16 as `presets/d16.yaml` builds it (depth 16, width 1024, 16 heads, vocabulary
4096, Cvae 32, 1000 classes, 16x16 latent = 256 px), bf16 autocast, the paper's 10-step schedule
1,2,3,4,5,6,8,10,13,16 (680 tokens). A step is what `train_transformer` does: take the batch from
the latent cache, quantise it at every scale, forward, label-smoothed loss, backward, clip, AdamW.
Per batch size, every combination of attention kernel (`sdpa`: dense block-causal mask;
`flex`: FlexAttention with the cached BlockMask, skipping masked blocks) and eager / compiled
(`compile_trunk`, sequences padded to a multiple of 128): seconds per step, tokens/s, peak memory,
compile time (first steps minus steady steps) and MFU. Model FLOPs are counted by torch's
FlopCounterMode on one eager SDPA step (matmuls and dense attention, forward and backward) and used
for every variant; MFU divides the achieved FLOP/s by the H100/H200 datasheet dense bf16 peak
(989 TFLOP/s) and, separately, by a bf16 matmul measured here. `--random-schedules N` trains the
compiled flex step on N random schedules (the training sampler) and reports graphs compiled
(torch._dynamo counters), compile time and steady tokens/s. `--time-limit` stops starting new
variants after that many seconds; every finished variant is already in `--out` (rewritten after each).
`--sample-batch` also times d16 generation at 256 px (10 steps, cfg 2.5, top-k 900) with the paper
tokenizer's decode. `--device cpu --depth 2` is a dry run of the script itself.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode


from flexvar.config import ScheduleConfig, TokenizerConfig, TrainTransformerConfig, TransformerConfig
from flexvar.generation.generate import generate_batch, make_generator
from flexvar.data.latent_cache import LatentSplit
from flexvar.tokenizer.quantizer import MultiScaleQuantizer
from flexvar.tokenizer.vqvae import VQVAE
from flexvar.transformer.model import FlexVAR
from flexvar.transformer.schedules import ScheduleSampler, num_tokens
from flexvar.optim import make_adamw
from flexvar.transformer.training import batch_indices, forward_backward

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


def d16(depth: int, attention: str) -> FlexVAR:
    return FlexVAR(TransformerConfig(depth=depth, attention=attention), 4096, 32, 1000, pe_size=16)


def build(depth: int, attention: str, compile_model: bool):
    torch.manual_seed(0)
    model = d16(depth, attention).to(DEV).train()
    opt = make_adamw(model, TrainTransformerConfig(lr=8e-4))
    if compile_model:
        model.compile_trunk(128)
    return model, opt


def latent_cache(n: int = 1024) -> LatentSplit:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, 32, 16, 16, generator=g)
    return LatentSplit(z, torch.randint(0, 1000, (n,), generator=g), [str(i) for i in range(1000)])


def train_step(model, opt, quant, data, i: int, batch: int, scales=SCALES) -> None:
    """What train_transformer does per step (one micro-batch): forward_backward, clip, AdamW."""
    items = batch_indices(i, batch, 2 * len(data), 0)
    forward_backward(model, quant, data, items, scales, TrainTransformerConfig(precision="bf16"), prediction="gt",
                     device=DEV)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_flops(depth: int, batch: int, quant, data) -> float:
    """Model FLOPs of one step (eager, dense SDPA attention), forward and backward."""
    model, opt = build(depth, "sdpa", False)
    with FlopCounterMode(display=False) as fc:
        train_step(model, opt, quant, data, 0, batch)
    del model, opt
    return fc.get_total_flops()


def free() -> None:
    torch._dynamo.reset()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_train(depth: int, batch: int, steps: int, attention: str, compile_model: bool, flops: float,
                peak_measured: float, quant, data) -> dict:
    counters.clear()
    model, opt = build(depth, attention, compile_model)
    t0 = sync_time()
    for i in range(3):                                   # warm-up (and compilation)
        train_step(model, opt, quant, data, i, batch)
    warm_s = sync_time() - t0
    times = []
    for i in range(steps):
        t = sync_time()
        train_step(model, opt, quant, data, 3 + i, batch)
        times.append(sync_time() - t)
    s = statistics.median(times)
    out = {"batch": batch, "attention": attention, "compile": compile_model, "s_per_step": round(s, 4),
           "images_per_s": round(batch / s, 1), "tokens_per_s": round(batch * sum(h * w for h, w in SCALES) / s),
           "model_tflop_per_step": round(flops / 1e12, 2), "achieved_tflops": round(flops / s / 1e12, 1),
           "mfu_vs_datasheet": round(flops / s / 1e12 / PEAK_BF16_TFLOPS, 3),
           "mfu_vs_measured_matmul": round(flops / s / 1e12 / peak_measured, 3), "warmup_s": round(warm_s, 1),
           "compile_s": round(warm_s - 3 * s, 1) if compile_model else None,
           "graphs_compiled": counters["stats"]["unique_graphs"] if compile_model else None,
           "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if DEV.type == "cuda" else None}
    del model, opt
    free()
    return out


def bench_random_schedules(depth: int, batch: int, n: int, attention: str, quant, data) -> dict:
    """The compiled step on n random training schedules: graphs compiled, compile time, steady throughput."""
    counters.clear()
    model, opt = build(depth, attention, True)
    sampler = ScheduleSampler(ScheduleConfig(), (16, 16), 0)
    times, tokens, first_seen = [], [], {}
    for i in range(n):
        scales = sampler.sample()
        bucket = -(-num_tokens(scales) // model.seq_bucket)
        t = sync_time()
        train_step(model, opt, quant, data, i, batch, scales)
        times.append(sync_time() - t)
        tokens.append(batch * num_tokens(scales))
        first_seen.setdefault(bucket, i)
    steady = [i for i in range(n) if i not in first_seen.values()]
    steady_s = sum(times[i] for i in steady) / max(len(steady), 1)
    out = {"batch": batch, "attention": attention, "schedules": n, "length_buckets": len(first_seen),
           "graphs_compiled": counters["stats"]["unique_graphs"],
           "compile_s": round(sum(times[i] - steady_s for i in first_seen.values()), 1),
           "steady_tokens_per_s": round(sum(tokens[i] for i in steady) / max(sum(times[i] for i in steady), 1e-9)),
           "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if DEV.type == "cuda" else None}
    del model, opt
    free()
    return out


def bench_sample(batch: int) -> dict:
    torch.manual_seed(0)
    model = d16(16, "auto").to(DEV).eval()
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
    ap.add_argument("--attention", nargs="+", default=["sdpa", "flex"], choices=["sdpa", "flex"])
    ap.add_argument("--compile-modes", type=int, nargs="+", default=[0, 1], choices=[0, 1], help="0 eager, 1 compiled")
    ap.add_argument("--random-schedules", type=int, default=50, help="0 skips the random-schedule compile run")
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds; no new variant starts after it")
    ap.add_argument("--out", default="", help="JSON file rewritten after every variant")
    ap.add_argument("--sample-batch", type=int, default=64, help="0 skips the sampling timing")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--depth", type=int, default=16, help="16 = the paper's d16 (smaller: dry runs)")
    args = ap.parse_args()
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_d16.py needs a CUDA device (or --device cpu for a dry run)")
    t_start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_tflops()
    quant, data = MultiScaleQuantizer(4096, 32).to(DEV), latent_cache()
    report = {"gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "torch": torch.__version__,
              "depth": args.depth, "params_M": round(d16(args.depth, "sdpa").num_params() / 1e6, 1),
              "schedule": SIDES, "tokens": sum(h * w for h, w in SCALES),
              "matmul_bf16_tflops_measured": round(peak, 1), "train": [], "skipped": []}

    def emit(section: str, row: dict) -> None:
        if section == "train":
            report["train"].append(row)
        else:
            report[section] = row
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))

    def in_time(what: str) -> bool:
        if time.perf_counter() - t_start < args.time_limit:
            return True
        report["skipped"].append(what)
        return False
    for batch in args.batches:
        flops = step_flops(args.depth, batch, quant, data)
        for attention in args.attention:
            for compiled in args.compile_modes:
                if in_time(f"batch {batch} {attention} compile={bool(compiled)}"):
                    emit("train", bench_train(args.depth, batch, args.steps, attention, bool(compiled), flops, peak,
                                              quant, data))
    if args.random_schedules and in_time("random schedules"):
        emit("random_schedules", bench_random_schedules(args.depth, args.batches[0], args.random_schedules,
                                                        args.attention[-1], quant, data))
    if args.sample_batch and in_time("sampling"):
        emit("sample", bench_sample(args.sample_batch))
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
