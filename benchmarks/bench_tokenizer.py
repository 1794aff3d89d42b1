"""Tokenizer train step and inference, ours beside the official FlexVAR/LlamaGen VQ code in one process,
printed as JSON.

    FLEXVAR_OFFICIAL_DIR=/path/to/FlexVAR python -m benchmarks.bench_tokenizer [--res 128] [--batch 2]
        [--rounds 3]

Setting: the official VQ-16 layout (base width 128, multipliers 1,1,2,2,4, 2 res blocks, z 256, Cvae 32,
4096 codes) at `--res` pixels. Variants, timed in interleaved rounds:
  - `train`: one multi-scale training step — encode, K=5 fixed scales quantised and decoded, L1+L2
    reconstruction against the area-resized image plus codebook and commitment losses, backward,
    optimiser. Official: `VQModel.forward(x, v_patch_nums)` (their multi-scale path) with that loss
    and Adam, fp32 and under CPU bf16 autocast; ours: `TokenizerTrainer.train_step` in bf16;
  - `infer`: encode, quantise at every scale 1..full, decode every scale, no grad. Official:
    `encode_conti`, area-down + `quantize`, `decode`; ours: `encode_bf16`, `quantize_at`, `decode_bf16` (the
    cached bf16 encoder/decoder `evaluate_scales` uses in bf16).
Without FLEXVAR_OFFICIAL_DIR only ours is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F


from benchmarks.side_by_side import (add_threads_arg, bf16_autocast, interleave, machine, official_modules,
                                     quiet, ratios, setup_process)
import flexvar.tokenizer.training as tt
from flexvar.config import TokenizerConfig, TrainTokenizerConfig
from flexvar.tokenizer.bf16_copy import decode_bf16, encode_bf16

VQ16 = TokenizerConfig(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256, codebook_dim=32,
                       codebook_size=4096)
CPU = torch.device("cpu")


def fixed_scales(full: int, k: int = 5) -> list[int]:
    """K scales spread over [1, full], ending at full: the same shapes every iteration."""
    return sorted({max(1, round(full * (i + 1) / k)) for i in range(k)})


def ours(res: int, batch: int) -> dict:
    """Our train step (fixed scales) and inference at every scale, bf16."""
    images = torch.randint(0, 256, (batch * 2, 3, res, res), dtype=torch.uint8)
    full = res // VQ16.downsample
    scales = fixed_scales(full)
    tt.sample_scales = lambda f, k, gen: scales        # fixed shapes every iteration (this process only)
    trainer = tt.TokenizerTrainer(VQ16, TrainTokenizerConfig(batch_size=batch, precision="bf16", warmup_steps=1),
                                  0, images, CPU)
    torch.manual_seed(0)
    model = tt.VQVAE(VQ16).eval()
    x = torch.rand(batch, 3, res, res) * 2 - 1

    @torch.no_grad()
    def infer():
        z = encode_bf16(model, x)               # as tt.evaluate_scales encodes and decodes in bf16
        for s in range(1, full + 1):
            _, zq = model.quantize_at(z.float(), (s, s))
            decode_bf16(model, zq)

    return {"train": trainer.train_step, "infer": infer}


def official(mods: SimpleNamespace, res: int, batch: int) -> dict:
    """The official VQ-16 trained through its multi-scale forward, and run scale by scale for inference."""
    torch.manual_seed(0)
    vae = quiet(mods.VQ_16, codebook_size=VQ16.codebook_size, codebook_embed_dim=VQ16.codebook_dim)
    vae.quantize.codebook_used.requires_grad_(False)   # a usage buffer built from an nn.Parameter
    opt = torch.optim.Adam(vae.parameters(), lr=1e-4, betas=(0.9, 0.95))
    x = torch.rand(batch, 3, res, res) * 2 - 1
    full = res // 16
    scales = fixed_scales(full)

    def train(bf16: bool):
        vae.train()
        with bf16_autocast(bf16):
            decs, vq_losses = vae(x, v_patch_nums=scales)
            loss = 0.0
            for dec, (vq_loss, commit_loss, _, _) in zip(decs, vq_losses):
                target = F.interpolate(x, size=dec.shape[-2:], mode="area")
                dec = dec.float()
                loss = loss + F.l1_loss(dec, target) + F.mse_loss(dec, target) + vq_loss + commit_loss
        (loss / len(scales)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer(bf16: bool):
        vae.eval()
        with bf16_autocast(bf16):
            h = vae.encode_conti(x)
            for s in range(1, full + 1):
                quant, _, _ = vae.quantize(F.interpolate(h.float(), size=(s, s), mode="area"))
                vae.decode(quant)

    return {f"{kind} {p}": (lambda fn=fn, bf16=(p == "bf16"): fn(bf16))
            for kind, fn in (("train", train), ("infer", infer)) for p in ("fp32", "bf16")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, default=128, help="image side in pixels (a multiple of 16)")
    ap.add_argument("--batch", type=int, default=2)
    add_threads_arg(ap, rounds=3, malloc="default")   # glibc defaults, as the tokenizer stages run
    args = ap.parse_args(argv)
    setup_process(args)
    if args.res % 16:
        print(f"bench_tokenizer: --res {args.res} is not a multiple of 16", file=sys.stderr)
        return 2
    mods, note = official_modules()
    print(f"[bench_tokenizer] {note}", file=sys.stderr, flush=True)
    out = {"config": {**VQ16.model_dump(mode="json"), "resolution": args.res, "batch": args.batch,
                      "train_scales": fixed_scales(args.res // 16), "rounds": args.rounds},
           "official": note, "machine": machine()}
    mine = ours(args.res, args.batch)
    theirs = official(mods, args.res, args.batch) if mods else {}
    for kind in ("train", "infer"):
        variants = {f"official {p}": theirs[f"{kind} {p}"] for p in ("fp32", "bf16") if theirs}
        variants["ours bf16"] = mine[kind]
        res = interleave(variants, args.rounds)
        out[kind] = {"results": res, "speedup": ratios(res, "ours bf16"),
                     "images_per_s": {k: round(args.batch / r["median_s"], 3) for k, r in res.items()}}
        print(json.dumps({kind: out[kind]["speedup"]}), file=sys.stderr, flush=True)
    out["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
