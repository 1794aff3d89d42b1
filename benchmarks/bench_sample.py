"""Sampling speed, ours beside the official FlexVAR code in one process, printed as JSON.

    FLEXVAR_OFFICIAL_DIR=/path/to/FlexVAR python -m benchmarks.bench_sample [--rounds 3]

Setting (issue 18): batch 16, cfg 1.5 (ramped over steps), top-k 100, schedule 1,2,3,4,5,6,8, depth 6 /
width 384 / 6 heads, vocabulary 4096, the official VQ-16 tokenizer layout (base width 128, multipliers
1,1,2,2,4, z 256, Cvae 32) decoding to 128 px. Variants, timed in interleaved rounds, end to end and
without the final decode:
  - `official fp32` / `official bf16`: the official `autoregressive_infer_cfg` with the official VQ-16,
    plain and under CPU bf16 autocast (without decode: the same call with the decoder left out);
  - `ours bf16`: `generate_batch` in bf16 (this library's default precision on a bf16 CPU).
Weights are random: speed does not depend on them. Without FLEXVAR_OFFICIAL_DIR only ours is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch


from benchmarks.side_by_side import (add_threads_arg, bf16_autocast, interleave, machine, official_modules,
                                     quiet, ratios, setup_process)
from flexvar.config import TokenizerConfig, TransformerConfig
from flexvar.generation.generate import generate_batch, make_generator
from flexvar.tokenizer.vqvae import VQVAE
from flexvar.transformer.model import FlexVAR

BATCH, CFG, TOP_K = 16, 1.5, 100
SIDES = [1, 2, 3, 4, 5, 6, 8]
DEPTH, WIDTH, HEADS, VOCAB, CVAE, CLASSES = 6, 384, 6, 4096, 32, 1000
LABELS = torch.arange(BATCH) * 37 % CLASSES


def build(device: torch.device) -> tuple[FlexVAR, VQVAE]:
    torch.manual_seed(0)
    vq = VQVAE(TokenizerConfig(ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, z_channels=256,
                               codebook_dim=CVAE, codebook_size=VOCAB))
    model = FlexVAR(TransformerConfig(depth=DEPTH, width=WIDTH, heads=HEADS), vocab_size=VOCAB, codebook_dim=CVAE,
                    num_classes=CLASSES, pe_size=16)
    return model.to(device).eval(), vq.to(device).eval()


def sampler(model: FlexVAR, vq: VQVAE, decode: bool, precision: str = "bf16"):
    """One batch of our sampling (a fresh seeded generator per call)."""
    scales = [(s, s) for s in SIDES]
    return lambda: generate_batch(model, vq, LABELS, scales, cfg=CFG, top_k=TOP_K, generator=make_generator(0),
                                  decode=decode, precision=precision)


def official_samplers(mods: SimpleNamespace) -> dict:
    """The official sampler with the official VQ-16, fp32 and bf16 autocast, with and without decode."""
    torch.manual_seed(0)
    vae = quiet(mods.VQ_16, codebook_size=VOCAB, codebook_embed_dim=CVAE).eval()
    var = quiet(mods.FlexVAR, vae, num_classes=CLASSES, depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS,
                norm_eps=1e-6, attn_l2_norm=True, patch_nums=tuple(SIDES)).eval()
    var.init_weights(init_std=-1)
    no_decoder = SimpleNamespace(quantize=vae.quantize, decode_code=lambda idx, shape: idx)

    def run(bf16: bool, decode: bool):
        with torch.inference_mode(), bf16_autocast(bf16):
            var.autoregressive_infer_cfg(vae if decode else no_decoder, BATCH, LABELS, SIDES, g_seed=0, cfg=CFG,
                                         top_k=TOP_K, top_p=0.0)

    return {(p, d): (lambda bf16=(p == "bf16"), d=d: run(bf16, d)) for p in ("fp32", "bf16") for d in (True, False)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_threads_arg(ap, rounds=3, malloc="default")   # glibc defaults, as the sample stage runs
    args = ap.parse_args(argv)
    setup_process(args)
    mods, note = official_modules()
    print(f"[bench_sample] {note}", file=sys.stderr, flush=True)
    out = {"config": {"batch": BATCH, "cfg": CFG, "top_k": TOP_K, "schedule": SIDES, "depth": DEPTH, "width": WIDTH,
                      "vocab": VOCAB, "tokenizer": "VQ-16 layout, ch 128, 1-1-2-2-4", "image_px": 8 * 16,
                      "rounds": args.rounds},
           "official": note, "machine": machine()}
    model, vq = build(torch.device("cpu"))
    theirs = official_samplers(mods) if mods else {}
    for decode, kind in ((True, "end_to_end"), (False, "no_decode")):
        variants = {f"official {p}": theirs[(p, decode)] for p in ("fp32", "bf16") if theirs}
        variants["ours bf16"] = sampler(model, vq, decode)
        res = interleave(variants, args.rounds)
        out[kind] = {"results": res, "speedup": ratios(res, "ours bf16")}
        print(json.dumps({kind: out[kind]["speedup"]}), file=sys.stderr, flush=True)
    out["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
