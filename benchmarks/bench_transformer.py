"""Transformer training-step benchmark (issue 4), printed as JSON.

    python benchmarks/bench_transformer.py [--steps 5] [--batches 8 32] [--precisions fp32 bf16] [--loss-curves 40]

Model: depth 6, width 384, 6 heads, vocabulary 4096, Cvae 32, 1000 classes; 8x8 latent, schedule
1,2,3,4,5,6,8 (155 tokens). `transformer_only`: forward, loss, backward, AdamW on prepared
inputs. `full_step`: the same plus taking the batch from the latent cache and quantising it at
every scale (what train_transformer does each step; the official trainer ran the encoder here).
Reference figures on this CPU (issue 4): official 0.64 s per transformer-only step and 1.58 s per
full step at batch 8. `--loss-curves N` also trains a small model N steps in fp32 and bf16 from
the same seed and data and reports both loss curves.
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

from flexvar.config import TrainTransformerConfig, TransformerConfig  # noqa: E402
from flexvar.device import autocast_ctx, cpu_has_fast_bf16  # noqa: E402
from flexvar.data.latent_cache import LatentSplit  # noqa: E402
from flexvar.tokenizer.quantizer import MultiScaleQuantizer  # noqa: E402
from flexvar.transformer.teacher_forcing import gt_inputs_targets  # noqa: E402
from flexvar.transformer.model import FlexVAR  # noqa: E402
from flexvar.transformer.training import (batch_indices, forward_backward, get_batch, make_optimizer,  # noqa: E402
                                          token_loss)

OFFICIAL = {"transformer_only_s_per_step_b8": 0.64, "full_step_s_per_step_b8": 1.58}
SCALES = [(s, s) for s in (1, 2, 3, 4, 5, 6, 8)]
DEVICE = torch.device("cpu")


def matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def cache(n: int, seed: int = 0) -> LatentSplit:
    """A synthetic latent cache (image + flip) shaped like the embedded default's."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 1000, (n,), generator=g)
    z = torch.randn(n, 2, 32, 8, 8, generator=g)
    return LatentSplit(z, labels, [str(i) for i in range(1000)])


def time_steps(batch: int, precision: str, steps: int, full: bool) -> list[float]:
    torch.manual_seed(0)
    model = FlexVAR(TransformerConfig(depth=6, width=384, heads=6), 4096, 32, 1000, pe_size=8).train()
    opt = make_optimizer(model, TrainTransformerConfig())
    q = MultiScaleQuantizer(4096, 32)
    data = cache(max(4 * batch, 64))
    z, labels = get_batch(data, batch_indices(0, batch, 2 * len(data), 0), DEVICE)
    x, tgt = gt_inputs_targets(q, z, SCALES)
    cfg = TrainTransformerConfig(precision=precision)
    times = []
    for i in range(steps + 2):                          # 2 warm-up steps
        t = time.perf_counter()
        if full:                                        # exactly train_transformer's micro-step
            forward_backward(model, q, data, batch_indices(i, batch, 2 * len(data), 0), SCALES, cfg,
                             prediction="gt", device=DEVICE)
        else:                                           # the same on inputs prepared once
            with autocast_ctx(DEVICE, precision):
                logits = model(labels, x, SCALES)
            token_loss(logits, tgt, cfg.label_smoothing).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return times


def loss_curves(steps: int) -> dict:
    """Same seed, data and schedule per step; fp32 vs bf16 autocast. Returns both curves."""
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(10, 32, 2, 2, generator=g)
    labels = torch.randint(0, 10, (512,), generator=g)
    z = torch.nn.functional.interpolate(protos[labels], size=(8, 8), mode="bilinear") + 0.3 * torch.randn(512, 32, 8, 8, generator=g)
    data = LatentSplit(torch.stack([z, z.flip(-1)], 1), labels, [str(i) for i in range(10)])
    q = MultiScaleQuantizer(512, 32)
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = FlexVAR(TransformerConfig(depth=2), 512, 32, 10, pe_size=8).train()
        opt = make_optimizer(model, TrainTransformerConfig(lr=1e-3))
        curve = []
        for i in range(steps):
            zb, lb = get_batch(data, batch_indices(i, 32, 1024, 0), DEVICE)
            x, tgt = gt_inputs_targets(q, zb, SCALES)
            with autocast_ctx(DEVICE, precision):
                loss = token_loss(model(lb, x, SCALES), tgt, 0.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(round(float(loss.detach()), 4))
        curves[precision] = curve
    diffs = [abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"])]
    tail = max(1, steps // 4)
    return {"steps": steps, **curves, "max_abs_diff": max(diffs),
            "final_fp32_mean_last_quarter": statistics.mean(curves["fp32"][-tail:]),
            "final_bf16_mean_last_quarter": statistics.mean(curves["bf16"][-tail:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--loss-curves", type=int, default=0, help="also compare fp32/bf16 loss curves over N steps")
    args = ap.parse_args()
    tokens = sum(h * w for h, w in SCALES)
    out = {"config": {"depth": 6, "width": 384, "heads": 6, "vocab": 4096, "latent": [8, 8], "tokens": tokens},
           "machine": {"threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
                       "cpu_native_bf16": cpu_has_fast_bf16(),
                       "matmul_gflops_fp32": round(matmul_gflops(torch.float32), 1),
                       "matmul_gflops_bf16": round(matmul_gflops(torch.bfloat16), 1)},
           "official": OFFICIAL, "results": []}
    for precision in args.precisions:
        for batch in args.batches:
            row = {"precision": precision, "batch": batch}
            for name, full in (("transformer_only", False), ("full_step", True)):
                s = statistics.median(time_steps(batch, precision, args.steps, full))
                row[name] = {"s_per_step": round(s, 4), "images_per_s": round(batch / s, 1),
                             "tokens_per_s": round(batch * tokens / s)}
            if batch == 8:
                row["speedup_vs_official"] = {
                    "transformer_only": round(OFFICIAL["transformer_only_s_per_step_b8"] / row["transformer_only"]["s_per_step"], 2),
                    "full_step": round(OFFICIAL["full_step_s_per_step_b8"] / row["full_step"]["s_per_step"], 2)}
            out["results"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.loss_curves:
        out["loss_curves"] = loss_curves(args.loss_curves)
    out["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
