"""What each CPU hot-path change of issue 18 buys: our bf16 train step and our bf16 sampling with one
change at a time put back to its previous formulation, all variants interleaved in one process,
printed as JSON.

    python benchmarks/ablate_cpu_step.py [--rounds 3] [--threads 1] [--what train compiled sample]
        [--only VARIANT ...]   # e.g. --what compiled --only "both new (6f9310a's compiled step)"

Train step variants: `current`; `fp32 softmax` (attention logits cast to fp32 for the softmax and
back); `F.normalize` (q/k normalised, then scaled, in two full-size passes); `mixed-dtype AdaLN` (the
bf16 modulation factors multiplied into the fp32 stream directly); `F.cross_entropy` (on logits cast
to fp32); `foreach AdamW` (torch's default instead of fused); `norm unit rows`, `masked_fill mask` and
`clip, then step` (as below). Same setting as bench_transformer.py.
Compiled train step variants (`train_transformer.compile`, as bench_transformer.py --compiled):
`current`; `head and loss eager` (only the blocks compiled); `tanh GELU` (F.gelu traced instead of its
sigmoid form); `addmm bias` (each Linear traced as one addmm); `norm unit rows` (q/k scaled by
1 / max(norm, eps) instead of an fp32 rsqrt of the squared sum); `masked_fill mask` (the attention mask
applied by masked_fill instead of an additive 0 / -inf); `bool mask in the graph` (the bool mask passed into
the compiled blocks and made additive there, instead of the additive matrix built outside);
`unbind q, k, v` (q, k, v split by one rearrange to (3, B, H, L, c) instead of chunk); `16-token length
bucket` (the blocks compiled for static shapes, 155 tokens padded to 160, instead of one graph with a
dynamic length); `clip, then step` (the gradients clipped in place by clip_grad_norm_, then AdamW,
instead of the clip handed to fused AdamW as its grad_scale); both new at once with the bucket and the
separate clip (the compiled step of 6f9310a); all of them (the compiled step of c8a3981).
Sampling variants (with decode, same setting as bench_sample.py): `current`; `3x3 upsampling`
(nearest 2x + 3x3 conv instead of the sub-pixel 2x2 convs); `autocast Linear, then GELU` (every Linear
as autocast's addmm and GELU as its own pass, instead of oneDNN's linear on cached bf16 weights with
GELU fused); `AdaLN every step` (modulation recomputed at every step instead of once per
sample); `one decoder call` (no chunks); `trunk in chunks of the finish` (the decoder's
low-resolution trunk chunked by the output's pixels, as the full-resolution finish, instead of by its
own). Each is the previous code's formula, swapped in through the module attribute the code calls.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.bench_transformer as BT  # noqa: E402
from benchmarks.bench_transformer import ours  # noqa: E402
from benchmarks.side_by_side import (add_threads_arg, interleave, machine, paired_ratio, setup_process,  # noqa: E402
                                     timing_key)
from benchmarks.bench_sample import build as build_sampler, sampler  # noqa: E402
import flexvar.distributed as D  # noqa: E402
import flexvar.optim as O  # noqa: E402
import flexvar.tokenizer.bf16_copy as BD  # noqa: E402
import flexvar.transformer.fast_paths as FL  # noqa: E402
import flexvar.transformer.model as M  # noqa: E402
import flexvar.transformer.training as T  # noqa: E402


def allowed(mask):
    """The bool form of a bool or additive (0 / -inf) mask."""
    return mask if mask.dtype == torch.bool else mask == 0


def fp32_softmax_attention(q, k, v, mask, dropout_p):
    logits = (q @ k.transpose(-2, -1)).float()
    if mask is not None:
        logits = logits.masked_fill(~allowed(mask), float("-inf"))
    return F.dropout(logits.softmax(-1), dropout_p).to(v.dtype) @ v


def normalize_then_scale(x, scale=None):
    x = F.normalize(x, dim=-1)
    return x if scale is None else x * scale.to(x.dtype)


def mixed_modulate(x, s, b):
    return M.layer_norm(x) * (1 + s) + b


def mixed_gated(x, h, g, p, training):
    return x + M.drop_path(h * g, p, training)


def plain_cross_entropy(logits, tgt, smoothing):
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), label_smoothing=smoothing)


def foreach_adamw(model, cfg):
    opt = ORIGINAL_MAKE_OPTIMIZER(model, cfg)
    return torch.optim.AdamW(opt.param_groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=True)


def clip_then_step(opt, params, max_norm):
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    opt.step()
    return norm


def norm_unit_rows(x, scale=None):
    inv = 1.0 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x * (inv if scale is None else inv * scale.to(inv.dtype))


def masked_fill_attention(q, k, v, mask, dropout_p):
    logits = q @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~allowed(mask), float("-inf"))
    return F.dropout(logits.softmax(-1), dropout_p) @ v


def addmm_linear(x, weight, bias, act):
    y = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    return F.gelu(y, approximate="tanh") if act == "gelu" else y


def unbind_qkv_forward(self, x_BLC, mask_LL, attend=None):
    """SelfAttention.forward with q, k, v split by one rearrange to (3, B, H, L, c) (its backward: a stack)."""
    qkv = self.qkv(x_BLC, bias=torch.cat([self.q_bias, self.zero_k_bias, self.v_bias]))
    q, k, v = rearrange(qkv, "b l (three h c) -> three b h l c", three=3, h=self.heads)
    q = M.unit_rows(q, self.log_scale_1H11.clamp(max=M.MAX_LOG_ATTN_SCALE).exp())
    out = (attend or M.attention)(q, M.unit_rows(k), v, mask_LL, self.attn_drop if self.training else 0.0)
    return self.proj_drop(self.proj(rearrange(out, "b h l c -> b l (h c)")))


@functools.lru_cache(maxsize=64)
def bool_mask(kind, scales, device, pad_to=0):
    """The block-causal mask as a bool (L, L) matrix (True = attend), cached per schedule as the model's."""
    level_L = M.scale_levels(scales, pad_to).to(device)
    return level_L[:, None] >= level_L[None, :]


def modulation_every_step(self, cond):
    return self.ada_lin(F.silu(cond))


ORIGINAL_MAKE_OPTIMIZER = O.make_adamw


@torch.no_grad()
def trunk_in_finish_chunks(vqvae, z_BChw):
    """decode_bf16 with the trunk chunked by the output image's pixels, as the finish is (before e12881b)."""
    post_quant_conv, decoder = BD.bf16_copy(vqvae, "decoder")
    pixels = z_BChw.shape[-2] * z_BChw.shape[-1] * vqvae.downsample ** 2
    feats_BCHW = BD.run_chunked(lambda z: decoder.trunk(post_quant_conv(z)), z_BChw, pixels, torch.bfloat16)
    return BD.run_chunked(decoder.finish, feats_BCHW, pixels)


SAMPLE_PATCHES = {
    "current": [],
    "3x3 upsampling": [(BD, "SubpixelUpsample", lambda up: up)],
    "autocast Linear, then GELU": [(FL, "cpu_bf16_inference", lambda x: False)],
    "AdaLN every step": [(M.AdaLNBlock, "modulation", modulation_every_step)],
    "one decoder call": [(BD, "CPU_CHUNK_PIXELS", 1 << 40)],
    "trunk in chunks of the finish": [(BD, "decode_bf16", trunk_in_finish_chunks)],
}
PATCHES = {
    "current": [],
    "fp32 softmax": [(M, "attention", fp32_softmax_attention)],
    "F.normalize": [(M, "unit_rows", normalize_then_scale)],
    "mixed-dtype AdaLN": [(M, "modulate", mixed_modulate), (M, "gated", mixed_gated)],
    "F.cross_entropy": [(T, "token_loss", plain_cross_entropy)],
    "norm unit rows": [(M, "unit_rows", norm_unit_rows)],
    "masked_fill mask": [(M, "attention", masked_fill_attention)],
    "clip, then step": [(D, "clipped_step", clip_then_step)],
}


COMPILED_PATCHES = {
    "current": [],
    "head and loss eager": [(T, "compiled_token_loss", lambda: T.token_loss)],
    "tanh GELU": [(FL, "tanh_gelu_as_sigmoid", lambda y: F.gelu(y, approximate="tanh"))],
    "addmm bias": [(FL, "compiled_linear", addmm_linear)],
    "norm unit rows": [(M, "unit_rows", norm_unit_rows)],
    "masked_fill mask": [(M, "attention", masked_fill_attention)],
    "bool mask in the graph": [(M, "attention_mask", bool_mask), (M, "attention", masked_fill_attention)],
    "unbind q, k, v": [(M.SelfAttention, "forward", unbind_qkv_forward)],
    "16-token length bucket": [(BT, "COMPILE_BUCKET", 16)],
    "clip, then step": PATCHES["clip, then step"],
}
EARLIER = COMPILED_PATCHES["16-token length bucket"] + PATCHES["clip, then step"]   # in every earlier compiled step
COMPILED_PATCHES["both new (6f9310a's compiled step)"] = (COMPILED_PATCHES["bool mask in the graph"]
                                                          + COMPILED_PATCHES["unbind q, k, v"] + EARLIER)
COMPILED_PATCHES["all of them (c8a3981's compiled step)"] = [p for k, ps in COMPILED_PATCHES.items()
                                                             if not k.startswith("both") for p in ps]


@contextlib.contextmanager
def patched(pairs):
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in pairs]
    for mod, name, fn in pairs:
        setattr(mod, name, fn)
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def selected(patches: dict, only: list[str] | None) -> dict:
    """`current` and the variants named in `only` (all when None): fewer variants per round means
    same-round ratios taken closer together in time."""
    return {k: v for k, v in patches.items() if only is None or k == "current" or k in only}


def train_variants(batch: int, only: list[str] | None = None) -> dict:
    variants = {}
    for name, pairs in selected(PATCHES, only).items():
        with patched(pairs):                        # the step's token_loss is looked up at call time
            step = ours(batch)["train_step"]

        def run(step=step, pairs=pairs):
            with patched(pairs):
                step()
        variants[name] = run
    if only is None or "foreach AdamW" in only:
        O.make_adamw = foreach_adamw
        try:
            variants["foreach AdamW"] = ours(batch)["train_step"]
        finally:
            O.make_adamw = ORIGINAL_MAKE_OPTIMIZER
    return variants


def compiled_variants(batch: int, only: list[str] | None = None) -> dict:
    """One compiled model per variant, each traced with its patch in place (dynamo keeps one graph per
    variant: its guards include the patched functions)."""
    torch._dynamo.config.cache_size_limit = 64
    variants = {}
    for name, pairs in selected(COMPILED_PATCHES, only).items():
        with patched(pairs):
            built = ours(batch, compiled=True)
        if name.startswith(("head and loss eager", "all of them")):
            built["model"]._compiled_head = None

        def run(step=built["train_step"], pairs=pairs):
            with patched(pairs):
                step()
        variants[name] = run
    return variants


def sample_variants(only: list[str] | None = None) -> dict:
    """One model + tokenizer per variant (same weights): each keeps its own cached bf16 decoder."""
    variants = {}
    for name, pairs in selected(SAMPLE_PATCHES, only).items():
        model, vq = build_sampler(torch.device("cpu"))
        step = sampler(model, vq, decode=True)

        def run(step=step, pairs=pairs):
            with patched(pairs):
                step()
        variants[name] = run
    return variants


def change_buys(variants: dict, rounds: int) -> dict:
    """Each variant's time over `current`'s, as the median of same-round ratios (`paired_ratio`)."""
    res = interleave(variants, rounds)
    key = timing_key()
    return {"timing": key, "results": res,
            "change_buys": {k: f"{paired_ratio(res, k, 'current', key):.3f}x" for k in res if k != "current"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--what", nargs="+", default=["train", "compiled", "sample"], choices=["train", "compiled", "sample"])
    ap.add_argument("--only", nargs="+", help="time only `current` and these variants")
    add_threads_arg(ap, rounds=3)
    args = ap.parse_args(argv)
    setup_process(args)
    out = {"machine": machine()}
    if "train" in args.what:
        out["train"] = change_buys(train_variants(args.batch, args.only), args.rounds)
    if "compiled" in args.what:
        out["compiled"] = change_buys(compiled_variants(args.batch, args.only), args.rounds)
    if "sample" in args.what:
        out["sample"] = change_buys(sample_variants(args.only), args.rounds)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
