"""How long `dvc repro` of a params file takes: a cost model, work (FLOPs) / rate + a fixed cost per stage.

Work is counted, not guessed: FLOPs of one forward of the real modules (torch's FlopCounterMode on
the meta device, nothing allocated), times what each stage does with it (3x forward = forward +
backward):

  prepare            images x PREPARE_S_PER_IMAGE seconds (assumed: decode, resize, PNG-encode)
  train_tokenizer    steps x batch x 3 x (encode + decode at the full size + (K-1) decodes at random
                     smaller scales, each on average a third of the full decode)
  extract_latents    2 views x images x encode
  train_transformer  per depth: steps x batch x 3 x forward over schedule.max_tokens tokens (the
                     sampler's cap, the canonical schedule's tokens unless set)
  sample             per depth x schedule: samples x (2 with cfg) x forward over the schedule's tokens
                     (KV cache: each token once) + decode at the final size
  train_feature_net  steps x batch x 3 x feature-net forward; evaluate: samples x feature-net forward

The rate (FLOP/s) is measured on this machine (`measure_rates`: a few timed training steps of the
stages' own code, the params' tokenizer and smallest transformer), or given, or, for a GPU budget
without a GPU here, assumed (ASSUMED_GPU_FLOPS). Small models on a CPU run far below peak and the rate
is measured on exactly those shapes and steps (quantiser, resizes, optimiser included), so the estimate
carries that; what it leaves out (evaluation inside training, data loading, bootstrap intervals) is in
the fixed STAGE_OVERHEAD_S.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from flexvar.config import Params
from flexvar.schedules import sampler_config, spec_scales

STAGE_OVERHEAD_S = 10.0       # assumed per stage process: imports, MLflow run, checkpoints, in-training eval
PREPARE_S_PER_IMAGE = 0.004   # assumed: PIL decode + resize + PNG encode of one image, one core
ASSUMED_GPU_FLOPS = {"tokenizer": 1.0e14, "transformer": 2.0e14}   # assumed H100-class bf16, 10% / 20% of peak
PROBE_FLOPS = 4e10            # a rate probe's forward is kept under this many FLOPs (a fraction of a second)


@dataclass
class DataCounts:
    """What the estimate needs to know about the data."""
    train: int
    val: int
    classes: int


@dataclass
class StageCost:
    stage: str
    kind: str          # which rate applies: tokenizer (convolutions) | transformer | io
    flops: float       # 0 for io stages
    seconds: float = 0.0


def _flops(fn) -> int:
    with torch.device("meta"), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _models(params: Params, depth: int, num_classes: int):
    from flexvar.tokenizer.vqvae import VQVAE
    from flexvar.transformer.model import FlexVAR

    with torch.device("meta"):
        vq = VQVAE(params.tokenizer)
        model = FlexVAR(params.transformer_for_depth(depth), vocab_size=params.tokenizer.codebook_size,
                        codebook_dim=params.tokenizer.codebook_dim, num_classes=num_classes,
                        pe_size=params.transformer.pos_embed_size or params.latent_size)
    return vq, model


def tokenizer_flops(vq, side: int, images: int = 1) -> tuple[int, int]:
    """(encode, decode) FLOPs of `images` images of side x side pixels."""
    f = vq.cfg.downsample
    enc = _flops(lambda: vq.encode(torch.empty(images, 3, side, side)))
    dec = _flops(lambda: vq.decode(torch.empty(images, vq.cfg.codebook_dim, side // f, side // f)))
    return enc, dec


def transformer_flops(model, scales: list[tuple[int, int]], batch: int = 1) -> int:
    """Forward FLOPs of a teacher-forced pass over `scales` (what a KV-cached generation computes too)."""
    L = sum(h * w for h, w in scales)
    return _flops(lambda: model(torch.zeros(batch, dtype=torch.long),
                                torch.empty(batch, L - scales[0][0] * scales[0][1], model.codebook_dim), scales))


def token_scales(n_tokens: int, full: int) -> list[tuple[int, int]]:
    """Square scales 1, 2, ... whose tokens add up to about `n_tokens`, ending at `full` (a stand-in schedule)."""
    scales, s = [], 1
    while s < full and sum(x * x for x in scales) + s * s + full * full <= n_tokens:
        scales.append(s)
        s += 1
    return [(x, x) for x in scales] + [(full, full)]


def stage_costs(params: Params, counts: DataCounts) -> list[StageCost]:
    """Every stage of one `dvc repro` with its FLOPs (see the module docstring)."""
    from flexvar.evaluation.feature_net import FeatureNet

    n, f, res = params.latent_size, params.tokenizer.downsample, params.data.resolution
    images = counts.train + counts.val
    vq, _ = _models(params, min(params.variants.depths), counts.classes)
    enc, dec = tokenizer_flops(vq, res)
    tt, tr, sc = params.train_tokenizer, params.train_transformer, params.sample
    out = [StageCost("prepare", "io", 0.0, images * PREPARE_S_PER_IMAGE),
           StageCost("train_tokenizer", "tokenizer", tt.steps * tt.batch_size * 3.0 *
                     (enc + dec * (1 + (tt.num_scales - 1) / 3))),
           StageCost("extract_latents", "tokenizer", 2.0 * images * enc)]
    max_tokens = sampler_config(params.schedule, n).max_tokens
    samples = sc.per_class * counts.classes
    for depth in params.variants.depths:
        _, model = _models(params, depth, counts.classes)
        out.append(StageCost(f"train_transformer@d{depth}", "transformer",
                             tr.steps * tr.batch_size * 3.0 * transformer_flops(model, token_scales(max_tokens, n))))
        for name in params.variants.schedules:
            scales = spec_scales(sc.schedules[name], (n, n), f)
            h, w = scales[-1]
            dec_hw = _flops(lambda: vq.decode(torch.empty(1, vq.cfg.codebook_dim, h, w)))
            per_image = (2 if sc.guidance > 0 else 1) * transformer_flops(model, scales) + dec_hw
            out.append(StageCost(f"sample@d{depth}-{name}", "transformer", samples * per_image))
    with torch.device("meta"):
        fnet = FeatureNet(counts.classes, res)
    fwd = _flops(lambda: fnet(torch.empty(1, 3, res, res)))
    ev = params.evaluate
    out.append(StageCost("train_feature_net", "tokenizer",
                         ev.feature_net_steps * ev.feature_net_batch_size * 3.0 * fwd))
    out.append(StageCost("reference_stats", "tokenizer", counts.val * fwd))
    for depth in params.variants.depths:
        for name in params.variants.schedules:
            out.append(StageCost(f"evaluate@d{depth}-{name}", "tokenizer", samples * fwd))
    out.append(StageCost("report", "io", 0.0))
    return out


def _time(fn, repeats: int = 2) -> float:
    fn()   # warm-up (allocator, autocast caches, lazy init)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def measure_rates(params: Params, num_classes: int, device: torch.device) -> dict[str, float]:
    """FLOP/s of the stages' own training steps on `device`: `TokenizerTrainer.train_step` (K random scales,
    quantiser, losses, clipped AdamW) on random images, and the smallest transformer's `forward_backward`
    (quantised teacher-forcing inputs, label-smoothed loss) plus its clipped AdamW step over the sampler's
    token cap; each rate is the cost model's FLOPs for that step (`stage_costs`) over its time, so what a
    step does besides the counted convolutions and matmuls is in the rate. Shapes are shrunk to keep a step
    under PROBE_FLOPS (smaller batch, then the tokenizer at a smaller side, the transformer over fewer
    tokens). What the machine gives now: other processes' load counts."""
    from flexvar.data.latent_cache import LatentSplit
    from flexvar.distributed import clipped_step
    from flexvar.optim import make_adamw
    from flexvar.tokenizer.quantizer import MultiScaleQuantizer
    from flexvar.tokenizer.training import TokenizerTrainer
    from flexvar.transformer.model import FlexVAR
    from flexvar.transformer.training import forward_backward

    torch.manual_seed(0)
    n, f, tt, tr = params.latent_size, params.tokenizer.downsample, params.train_tokenizer, params.train_transformer
    depth = min(params.variants.depths)   # the least efficient per FLOP: the deeper ones' time is not underestimated
    vq_meta, model_meta = _models(params, depth, num_classes)
    side = params.data.resolution
    while side > 2 * f and sum(tokenizer_flops(vq_meta, side)) > PROBE_FLOPS:
        side //= 2
    enc, dec = tokenizer_flops(vq_meta, side)
    per_image = 3.0 * (enc + dec * (1 + (tt.num_scales - 1) / 3))    # stage_costs' train_tokenizer, one image
    batch = max(1, min(tt.batch_size, int(PROBE_FLOPS // per_image)))
    tokens, m = sampler_config(params.schedule, n).max_tokens, n
    while m > 1 and transformer_flops(model_meta, token_scales(tokens * m * m // (n * n), m)) > PROBE_FLOPS:
        m -= max(1, m // 4)
    scales = token_scales(tokens * m * m // (n * n), m)
    t_flops = transformer_flops(model_meta, scales)
    t_batch = max(1, min(tr.batch_size, int(PROBE_FLOPS // t_flops)))

    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
    trainer = TokenizerTrainer(params.tokenizer, tt.model_copy(update={"batch_size": batch, "micro_batch": "auto",
                                                                        "gan_weight": 0.0, "perceptual_weight": 0.0}),
                               params.seed, images, device)
    model = FlexVAR(params.transformer_for_depth(depth), vocab_size=params.tokenizer.codebook_size,
                    codebook_dim=params.tokenizer.codebook_dim, num_classes=num_classes,
                    pe_size=params.transformer.pos_embed_size or n).to(device).train()
    quantizer = MultiScaleQuantizer(params.tokenizer.codebook_size, params.tokenizer.codebook_dim).to(device)
    latents = LatentSplit(torch.randn(t_batch, 2, params.tokenizer.codebook_dim, m, m),
                          torch.arange(t_batch) % num_classes, [str(c) for c in range(num_classes)])
    opt = make_adamw(model, tr)
    items = torch.arange(t_batch)

    def tf_step():
        forward_backward(model, quantizer, latents, items, scales, tr, prediction=params.transformer.prediction,
                         device=device)
        clipped_step(opt, model.parameters(), tr.grad_clip)
        opt.zero_grad(set_to_none=True)

    def synced(fn):
        def run():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    return {"tokenizer": batch * per_image / _time(synced(trainer.train_step), repeats=3),
            "transformer": 3.0 * t_batch * t_flops / _time(synced(tf_step))}


def estimate(params: Params, counts: DataCounts, rates: dict[str, float]) -> list[StageCost]:
    """Stage costs with seconds filled in: FLOPs / rate + STAGE_OVERHEAD_S."""
    costs = stage_costs(params, counts)
    for c in costs:
        c.seconds += STAGE_OVERHEAD_S + compute_seconds(c, rates)
    return costs


def compute_seconds(cost: StageCost, rates: dict[str, float]) -> float:
    return cost.flops / rates[cost.kind] if cost.kind != "io" else 0.0


def data_counts(params: Params) -> DataCounts | None:
    """Images and classes of the params' data source without preparing it (file names only); None for hf."""
    from flexvar.data.prepare import IMAGE_EXTS
    from flexvar.data.synthetic import BUILTIN

    kind, _, rest = params.data.source.partition(":")
    if kind == "builtin":
        return DataCounts(params.data.num_train, params.data.num_val, len(BUILTIN.get(rest, [])) or 1)
    if kind != "imagefolder":
        return None
    root = Path(rest).expanduser()
    n = {}
    for split in ("train", "val"):
        d = root / split
        n[split] = sum(1 for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTS) if d.is_dir() else 0
    classes = sum(1 for d in (root / "train").iterdir() if d.is_dir()) if (root / "train").is_dir() else 0
    if not n["train"] or not classes:
        return None
    if not n["val"]:
        n["val"] = round(n["train"] * params.data.val_fraction)
        n["train"] -= n["val"]
    return DataCounts(n["train"], n["val"], classes)


def format_estimate(costs: list[StageCost], rates: dict[str, float], how: str) -> str:
    """A few lines: total, the largest stages, and how the rates were obtained."""
    total = sum(c.seconds for c in costs)
    groups: dict[str, float] = {}
    for c in costs:
        groups[c.stage.split("@")[0]] = groups.get(c.stage.split("@")[0], 0.0) + c.seconds
    parts = ", ".join(f"{k} {_fmt(v)}" for k, v in groups.items())
    return (f"estimated dvc repro time: {_fmt(total)} ({len(costs)} stages: {parts})\n"
            f"  cost model: FLOPs counted on the real modules / rate ({how}: tokenizer "
            f"{rates['tokenizer'] / 1e9:.0f} GFLOP/s, transformer {rates['transformer'] / 1e9:.0f} GFLOP/s) "
            f"+ {STAGE_OVERHEAD_S:.0f} s per stage and {PREPARE_S_PER_IMAGE * 1e3:g} ms per prepared image (assumed)")


def _fmt(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def parse_rates(text: str) -> dict[str, float]:
    """'G' (both) or 'G_TOKENIZER,G_TRANSFORMER' in GFLOP/s -> rates; ValueError if not positive numbers."""
    parts = [float(x) for x in text.split(",")]
    if len(parts) not in (1, 2) or not all(x > 0 and math.isfinite(x) for x in parts):
        raise ValueError(text)
    return {"tokenizer": parts[0] * 1e9, "transformer": parts[-1] * 1e9}


def rates_for(params: Params, num_classes: int, budget: str | None = None,
              rate_gflops: str | None = None) -> tuple[dict[str, float], str]:
    """(rates, how they were obtained): given, measured on this machine's device, or assumed for a GPU."""
    from flexvar.device import pick_device

    if rate_gflops is not None:
        return parse_rates(rate_gflops), "given"
    device = pick_device(params.resources.device)
    if budget == "gpu" and device.type != "cuda":
        return dict(ASSUMED_GPU_FLOPS), "assumed for a GPU (none here)"
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""
    return measure_rates(params, num_classes, device), f"measured on this machine ({device.type}{load})"


__all__ = ["DataCounts", "StageCost", "stage_costs", "measure_rates", "estimate", "compute_seconds", "data_counts",
           "format_estimate", "parse_rates", "rates_for"]
