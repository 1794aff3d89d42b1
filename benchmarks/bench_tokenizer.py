"""Tokenizer throughput benchmark (issue 3), printed as JSON.

    python benchmarks/bench_tokenizer.py [--params params.yaml] [--iters 3] [--batch 16]
                                         [--paper-batch 1] [--paper-iters 1] [--skip-paper] [--device cpu]

Two configurations: the embedded default (params.yaml `tokenizer`, `data.resolution`) and the
paper's (ch 128, multipliers 1,1,2,2,4, 2 res blocks, z 256, Cvae 32, 4096 codes, 256 px). For
each, fp32 vs bf16 autocast:
  - `train`: one tokenizer training step (encode, K=5 scales quantised + decoded, L1+L2 and VQ
    losses, backward, AdamW) with a fixed scale set so every iteration has the same shapes;
  - `infer`: encode + quantise at every scale 1..full + decode every scale, no grad.
Figures are images per second of wall time and, because other processes may share the CPU,
also per second of this process's CPU time (`img_per_cpu_s`; with N threads the ideal wall
figure is about N times that).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexvar.config import TokenizerConfig, TrainTokenizerConfig, load_params  # noqa: E402
from flexvar.device import autocast_ctx, cpu_has_fast_bf16, pick_device  # noqa: E402
import flexvar.tokenizer.training as tt  # noqa: E402

PAPER = TokenizerConfig(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256, codebook_dim=32,
                        codebook_size=4096)


def fixed_scales(full: int, k: int = 5) -> list[int]:
    """K scales spread over [1, full], ending at full: the same shapes every iteration."""
    return sorted({max(1, round(full * (i + 1) / k)) for i in range(k)})


def sig(x: float, digits: int = 3) -> float:
    """Round to `digits` significant digits (throughputs span 0.01 to 1000 img/s)."""
    return float(f"{x:.{digits}g}")


def timed(fn, iters: int, device: torch.device, warmup: int = 1) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - w0) / iters, (time.process_time() - c0) / iters


def bench_train(cfg: TokenizerConfig, res: int, batch: int, iters: int, precision: str, device, warmup: int) -> dict:
    images = torch.randint(0, 256, (batch * 2, 3, res, res), dtype=torch.uint8)
    full = res // cfg.downsample
    scales = fixed_scales(full)
    original, tt.sample_scales = tt.sample_scales, lambda f, k, gen: scales
    try:
        trainer = tt.TokenizerTrainer(cfg, TrainTokenizerConfig(batch_size=batch, precision=precision,
                                                                warmup_steps=1), 0, images, device)
        wall, cpu = timed(trainer.train_step, iters, device, warmup)
    finally:
        tt.sample_scales = original
    return {"scales": scales, "s_per_step": round(wall, 4), "img_per_s": sig(batch / wall),
            "img_per_cpu_s": sig(batch / cpu)}


def bench_infer(cfg: TokenizerConfig, res: int, batch: int, iters: int, precision: str, device, warmup: int) -> dict:
    torch.manual_seed(0)
    model = tt.VQVAE(cfg).to(device).eval()
    x = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    full = res // cfg.downsample

    @torch.no_grad()
    def run():
        with autocast_ctx(device, precision):
            z = model.encode(x)
        for s in range(1, full + 1):
            _, zq = model.quantize_at(z.float(), (s, s))
            with autocast_ctx(device, precision):
                model.decode(zq)

    wall, cpu = timed(run, iters, device, warmup)
    return {"scales": f"1..{full}", "s_per_batch": round(wall, 4), "img_per_s": sig(batch / wall),
            "img_per_cpu_s": sig(batch / cpu)}


def bench_config(name: str, cfg: TokenizerConfig, res: int, batch: int, iters: int, device, warmup: int) -> dict:
    out = {"config": {**cfg.model_dump(mode="json"), "resolution": res}, "batch": batch, "iters": iters, "warmup": warmup}
    for kind, fn in (("train", bench_train), ("infer", bench_infer)):
        for precision in ("fp32", "bf16"):
            out[f"{kind}_{precision}"] = fn(cfg, res, batch, iters, precision, device, warmup)
            print(f"[bench_tokenizer] {name} {kind} {precision}: {out[f'{kind}_{precision}']}", file=sys.stderr, flush=True)
        out[f"{kind}_bf16_speedup"] = sig(out[f"{kind}_bf16"]["img_per_cpu_s"] / out[f"{kind}_fp32"]["img_per_cpu_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations, embedded config")
    ap.add_argument("--batch", type=int, default=16, help="batch, embedded config")
    ap.add_argument("--paper-batch", type=int, default=1)
    ap.add_argument("--paper-iters", type=int, default=1)
    ap.add_argument("--paper-warmup", type=int, default=0, help="untimed calls before timing, paper config")
    ap.add_argument("--skip-paper", action="store_true", help="only the embedded config")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    params = load_params(args.params)
    result = {"device": str(device), "threads": torch.get_num_threads(), "cpu_fast_bf16": cpu_has_fast_bf16(),
              "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
              "embedded": bench_config("embedded", params.tokenizer, params.data.resolution, args.batch,
                                                 args.iters, device, warmup=1)}
    if not args.skip_paper:
        result["paper"] = bench_config("paper", PAPER, 256, args.paper_batch, args.paper_iters, device,
                                       warmup=args.paper_warmup)
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
