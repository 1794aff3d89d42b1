"""Sampling speed: images/s at batch 16, cfg 1.5, top-k 100, depth 6 / width 384 (vocab 4096),
tokenizer at base width 128 (LlamaGen VQ-16 layout), 128 px output, fp32 and bf16, with and
without the final decode; printed as JSON next to the official implementation's figures on the
same CPU (7-step schedule 1,2,3,4,5,6,8: 5.04 s per batch end to end, 4.07 s of it decode,
0.99 s without decode).

    .venv/bin/python benchmarks/bench_sample.py [--repeats 3] [--threads N] [--device cpu]

Weights are random: speed does not depend on them. Each figure is the median of `repeats`
timed batches after one warm-up batch.
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

from flexvar.config import TokenizerConfig, TransformerConfig  # noqa: E402
from flexvar.device import pick_device, resolve_precision  # noqa: E402
from flexvar.generation.generate import decode_tokens, generate_batch, make_generator  # noqa: E402
from flexvar.tokenizer.vqvae import VQVAE  # noqa: E402
from flexvar.transformer.model import FlexVAR  # noqa: E402

BATCH, CFG, TOP_K = 16, 1.5, 100
SCHEDULES = {"1,2,3,4,5,6,8": [1, 2, 3, 4, 5, 6, 8], "1..8": list(range(1, 9))}
OFFICIAL = {"schedule": "1,2,3,4,5,6,8", "s_per_batch_end_to_end": 5.04, "s_per_batch_decode": 4.07,
            "s_per_batch_no_decode": 0.99}
OFFICIAL["images_per_s_end_to_end"] = BATCH / OFFICIAL["s_per_batch_end_to_end"]
OFFICIAL["images_per_s_no_decode"] = BATCH / OFFICIAL["s_per_batch_no_decode"]


def build(device: torch.device) -> tuple[FlexVAR, VQVAE]:
    torch.manual_seed(0)
    vq = VQVAE(TokenizerConfig(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256,
                               codebook_dim=32, codebook_size=4096))
    model = FlexVAR(TransformerConfig(depth=6, width=384, heads=6), vocab_size=4096, codebook_dim=32,
                    num_classes=1000, pe_size=16)
    return model.to(device).eval(), vq.to(device).eval()


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(model, vq, sides: list[int], precision: str, repeats: int, device: torch.device) -> dict:
    scales = [(s, s) for s in sides]
    labels = torch.arange(BATCH) * 37 % 1000
    gen = make_generator(0, device)

    def sample(decode: bool):
        return generate_batch(model, vq, labels, scales, cfg=CFG, top_k=TOP_K, generator=gen, decode=decode,
                              precision=precision)

    idx = sample(False).tokens[-1].to(device)
    no_decode = timed(lambda: sample(False), repeats, device)
    decode = timed(lambda: decode_tokens(vq, idx, precision=precision), repeats, device)
    end_to_end = timed(lambda: sample(True), repeats, device)
    return {"s_per_batch_end_to_end": round(end_to_end, 3), "s_per_batch_no_decode": round(no_decode, 3),
            "s_per_batch_decode": round(decode, 3),
            "images_per_s_end_to_end": round(BATCH / end_to_end, 2),
            "images_per_s_no_decode": round(BATCH / no_decode, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--schedules", default="all", help=f"'all' or a ';'-separated subset of {list(SCHEDULES)}")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, vq = build(device)
    results = {}
    for name in SCHEDULES if args.schedules == "all" else args.schedules.split(";"):
        sides = SCHEDULES[name]
        for precision in args.precisions.split(","):
            results[f"{name} {precision}"] = bench(model, vq, sides, precision, args.repeats, device)
    ours = results[f"{OFFICIAL['schedule']} {'bf16' if 'bf16' in args.precisions else 'fp32'}"]
    report = {
        "config": {"batch": BATCH, "cfg": CFG, "top_k": TOP_K, "depth": 6, "width": 384, "vocab": 4096,
                   "tokenizer_ch": 128, "image_px": 128, "device": str(device),
                   "cpu_bf16": resolve_precision(device, "auto") == "bf16", "threads": torch.get_num_threads(),
                   "load_avg_1min": round(os.getloadavg()[0], 2), "repeats": args.repeats},
        "official": OFFICIAL,
        "ours": results,
        "speedup_end_to_end_vs_official": round(OFFICIAL["s_per_batch_end_to_end"] / ours["s_per_batch_end_to_end"], 2),
        "speedup_no_decode_vs_official": round(OFFICIAL["s_per_batch_no_decode"] / ours["s_per_batch_no_decode"], 2),
        "target_end_to_end": 2.5,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
