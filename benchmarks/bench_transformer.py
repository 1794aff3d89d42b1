"""Transformer training step, ours beside the official FlexVAR code in one process, printed as JSON.

    FLEXVAR_OFFICIAL_DIR=/path/to/FlexVAR python -m benchmarks.bench_transformer [--rounds 5] [--batch 8]
        [--loss-curves 40]

Setting (issue 18): depth 6, width 384, 6 heads, vocabulary 4096, Cvae 32, 1000 classes, 8x8 latent,
schedule 1,2,3,4,5,6,8 (155 tokens), batch 8. Variants, timed in interleaved rounds:
  - `official fp32` / `official bf16`: the official FlexVAR transformer (models/flexvar.py) trained as
    its trainer does (label-smoothed per-token loss weighted 1/L, clip, fused AdamW), in fp32 and
    under CPU bf16 autocast — the strongest setting a user of the official code has here;
  - `ours bf16`: this library's step (`forward_backward`, clip, AdamW) in its default precision;
  - `ours bf16 compiled` (with `--compiled`): the same with `train_transformer.compile: true` (the blocks
    through torch.compile/inductor), `compile_bucket` COMPILE_BUCKET; compiling is in the warm-up round.
`train_step`: forward, loss, backward, clip, optimiser on prepared inputs. `full_step`: the same plus
making the inputs — ours quantises cached latents at every scale; the official trainer encodes the
images (VQ-16 encoder at 128 px) and quantises. Without FLEXVAR_OFFICIAL_DIR only ours is timed.
`--loss-curves N` also trains a small model N steps in fp32 and bf16 from the same seed and data.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F


from benchmarks.side_by_side import (add_threads_arg, bf16_autocast, interleave, machine, official_modules,
                                     quiet, ratios, setup_process)
from flexvar import distributed
from flexvar.config import TrainTransformerConfig, TransformerConfig
from flexvar.data.latent_cache import LatentSplit
from flexvar.device import autocast_ctx
from flexvar.tokenizer.quantizer import MultiScaleQuantizer
from flexvar.transformer.model import FlexVAR
from flexvar.transformer.teacher_forcing import gt_inputs_targets
import flexvar.optim as optim
import flexvar.transformer.training as training
from flexvar.transformer.training import batch_indices, forward_backward, get_batch

SIDES = [1, 2, 3, 4, 5, 6, 8]
SCALES = [(s, s) for s in SIDES]
DEPTH, WIDTH, HEADS, VOCAB, CVAE, CLASSES = 6, 384, 6, 4096, 32, 1000
CPU = torch.device("cpu")
CFG = TrainTransformerConfig(precision="bf16")
COMPILE_BUCKET = 0       # dynamic sequence length: one graph for every schedule, no padding (the CPU's best;
                         # the config's default 128 suits random schedules on GPUs)


def cache(n: int, seed: int = 0) -> LatentSplit:
    """A synthetic latent cache (image + flip) shaped like the embedded default's."""
    g = torch.Generator().manual_seed(seed)
    return LatentSplit(torch.randn(n, 2, CVAE, 8, 8, generator=g), torch.randint(0, CLASSES, (n,), generator=g),
                       [str(i) for i in range(CLASSES)])


def ours(batch: int, compiled: bool = False) -> dict:
    """Our train step on prepared inputs, and our full step (quantise the cached latents, then the
    same); with `compiled`, as `train_transformer.compile` runs it (`compile_bucket` COMPILE_BUCKET)."""
    torch.manual_seed(0)
    model = FlexVAR(TransformerConfig(depth=DEPTH, width=WIDTH, heads=HEADS), VOCAB, CVAE, CLASSES, pe_size=8).train()
    if compiled:                                          # what training does with train_transformer.compile
        model.compile_trunk(COMPILE_BUCKET)
    cfg = CFG.model_copy(update={"compile": compiled})
    opt, q, data = optim.make_adamw(model, cfg), MultiScaleQuantizer(VOCAB, CVAE), cache(max(4 * batch, 64))
    loss_fn = training.loss_for(compiled)                 # what forward_backward uses
    z, labels = get_batch(data, batch_indices(0, batch, 2 * len(data), 0), CPU)
    x, tgt = gt_inputs_targets(q, z, SCALES)
    state = {"i": 0}

    def finish():                                         # what training does after each step's backward
        distributed.clipped_step(opt, model.parameters(), CFG.grad_clip)
        opt.zero_grad(set_to_none=True)

    def step(x_BLCv, tgt_BL, scales):
        with autocast_ctx(CPU, CFG.precision):
            logits = model(labels, x_BLCv, scales)
        loss_fn(logits, tgt_BL, cfg.label_smoothing).backward()
        finish()

    def full_step():
        state["i"] += 1
        forward_backward(model, q, data, batch_indices(state["i"], batch, 2 * len(data), 0), SCALES, cfg,
                         prediction="gt", device=CPU)
        finish()

    return {"train_step": lambda: step(x, tgt, SCALES), "full_step": full_step, "inputs": (labels, x, tgt)}


def official(mods: SimpleNamespace, batch: int, inputs) -> dict:
    """The official transformer stepped as its trainer does, fp32 and bf16 autocast (one model, one
    fused AdamW); the full step also encodes 128 px images with the official VQ-16 and quantises them."""
    torch.manual_seed(0)
    vae = quiet(mods.VQ_16, codebook_size=VOCAB, codebook_embed_dim=CVAE).eval().requires_grad_(False)
    var = quiet(mods.FlexVAR, vae, num_classes=CLASSES, depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS,
                drop_path_rate=0.1 * DEPTH / 24, norm_eps=1e-6, attn_l2_norm=True, patch_nums=tuple(SIDES),
                token_dropout_p=0.05, flash_if_available=True, fused_if_available=True).train()
    var.init_weights(init_std=-1)
    opt = torch.optim.AdamW(var.parameters(), lr=CFG.lr, betas=(0.9, 0.95), weight_decay=CFG.weight_decay, fused=True)
    labels, x, tgt = inputs
    images = torch.rand(batch, 3, 8 * 16, 8 * 16) * 2 - 1

    def encode():   # their trainer's encode_var_wo_firstL: encoder, then area-down + quantise per scale
        with torch.no_grad():
            h = vae.encode_conti(images)
            quant, idx = [], []
            for k, s in enumerate(SIDES):
                zq, _, info = vae.quantize(F.interpolate(h, size=(s, s), mode="area"))
                idx.append(info[-1].view(batch, -1))
                if k + 1 < len(SIDES):
                    quant.append(F.interpolate(zq, size=(SIDES[k + 1],) * 2, mode="bicubic").flatten(2))
        return torch.cat(quant, 2).transpose(1, 2), torch.cat(idx, 1)

    def step(bf16: bool, x_BLC, tgt_BL):
        with bf16_autocast(bf16):
            logits = var(labels, x_BLC, SIDES)
            loss = F.cross_entropy(logits.view(-1, VOCAB), tgt_BL.view(-1), label_smoothing=CFG.label_smoothing,
                                   reduction="none").view(batch, -1)
            loss = loss.mul(torch.full((1, loss.shape[1]), 1 / loss.shape[1])).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), CFG.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"train_step fp32": lambda: step(False, x, tgt), "train_step bf16": lambda: step(True, x, tgt),
            "full_step fp32": lambda: step(False, *encode()), "full_step bf16": lambda: step(True, *encode())}


def loss_curves(steps: int, compiled: bool = False) -> dict:
    """Same seed, data and schedule per step; fp32 vs bf16 autocast (and, with `compiled`, bf16 with
    train_transformer.compile). Returns the curves and each one's largest distance to fp32."""
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(10, CVAE, 2, 2, generator=g)
    labels = torch.randint(0, 10, (512,), generator=g)
    z = F.interpolate(protos[labels], size=(8, 8), mode="bilinear") + 0.3 * torch.randn(512, CVAE, 8, 8, generator=g)
    data = LatentSplit(torch.stack([z, z.flip(-1)], 1), labels, [str(i) for i in range(10)])
    torch.manual_seed(2)                 # the codebook's init draws from the global RNG: fix it too
    q = MultiScaleQuantizer(512, CVAE)
    curves = {}
    for variant in ("fp32", "bf16", "bf16 compiled")[:3 if compiled else 2]:
        precision = variant.split()[0]
        torch.manual_seed(0)
        model = FlexVAR(TransformerConfig(depth=2), 512, CVAE, 10, pe_size=8).train()
        compiled = variant == "bf16 compiled"
        if compiled:
            model.compile_trunk(COMPILE_BUCKET)
        loss_fn = training.loss_for(compiled)
        opt = optim.make_adamw(model, TrainTransformerConfig(lr=1e-3))
        curve = []
        for i in range(steps):
            zb, lb = get_batch(data, batch_indices(i, 32, 1024, 0), CPU)
            x, tgt = gt_inputs_targets(q, zb, SCALES)
            with autocast_ctx(CPU, precision):
                loss = loss_fn(model(lb, x, SCALES), tgt, 0.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(round(float(loss.detach()), 4))
        curves[variant] = curve
    tail = max(1, steps // 4)
    out = {"steps": steps, **curves}
    for variant in list(curves)[1:]:
        out[f"max_abs_diff {variant} vs fp32"] = max(abs(a - b) for a, b in zip(curves["fp32"], curves[variant]))
    for variant in curves:
        out[f"final_{variant.replace(' ', '_')}_mean_last_quarter"] = statistics.mean(curves[variant][-tail:])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loss-curves", type=int, default=0, help="also compare fp32/bf16 loss curves over N steps")
    ap.add_argument("--compiled", action="store_true", help="also time our step with train_transformer.compile")
    add_threads_arg(ap, rounds=5)
    args = ap.parse_args(argv)
    setup_process(args)
    mods, note = official_modules()
    print(f"[bench_transformer] {note}", file=sys.stderr, flush=True)
    out = {"config": {"depth": DEPTH, "width": WIDTH, "heads": HEADS, "vocab": VOCAB, "schedule": SIDES,
                      "tokens": sum(s * s for s in SIDES), "batch": args.batch, "rounds": args.rounds},
           "official": note, "machine": machine()}
    mine = ours(args.batch)
    mine_compiled = ours(args.batch, compiled=True) if args.compiled else {}
    theirs = official(mods, args.batch, mine["inputs"]) if mods else {}
    for kind in ("train_step", "full_step"):
        variants = {f"official {p}": theirs[f"{kind} {p}"] for p in ("fp32", "bf16") if theirs}
        variants["ours bf16"] = mine[kind]
        if mine_compiled:
            variants["ours bf16 compiled"] = mine_compiled[kind]
        res = interleave(variants, args.rounds)
        speedup = ratios(res, "ours bf16")
        if mine_compiled:
            speedup |= {k: v for k, v in ratios(res, "ours bf16 compiled").items() if "vs official" in k}
        out[kind] = {"results": res, "speedup": speedup}
        print(json.dumps({kind: out[kind]["speedup"]}), file=sys.stderr, flush=True)
    if args.loss_curves:
        out["loss_curves"] = loss_curves(args.loss_curves, args.compiled)
    out["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
