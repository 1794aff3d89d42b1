"""Device check: the library's training, resume, generation and edit paths run unchanged on a GPU.

    python -m benchmarks.gpu_library_check [--device cuda]

The test suite runs on CPU (CI has no GPU); this script runs the same library entry points the
pipeline stages call, on CUDA, at a tiny size: tokenizer training with a checkpoint and a resume,
latent extraction, transformer training (GT and residual) with a stop and a resume, then
generation at 1x / 1.5x / non-square sizes and refine / in-paint / out-paint / extend. It checks
shapes, finite values, that the resumes continue from their checkpoints, and that forced tokens
are held; prints one JSON report and exits non-zero on the first failed check.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch


from flexvar.config import ScheduleConfig, TokenizerConfig, TrainTokenizerConfig, TrainTransformerConfig, TransformerConfig
from flexvar.config import SamplingSettings
from flexvar.data.splits import ImageSplit, to_unit_range
from flexvar.generation.editing import box_mask, extend, inpaint, outpaint, refine
from flexvar.generation.generate import generate
from flexvar.schedules import resolve_schedule
from flexvar.data.latent_cache import LatentSplit, encode_batches
from flexvar.tokenizer.bf16_copy import encode_images
from flexvar.data.sampling import RangeBatchSampler
from flexvar.data.synthetic import SHAPES_CLASSES, render_shapes
from flexvar.tokenizer.training import TokenizerTrainer, evaluate_scales
from flexvar.transformer.model import FlexVAR
from flexvar.transformer.training import train_transformer


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"gpu_library_check: FAILED: {what}")


def shapes_split(n: int, seed: int) -> ImageSplit:
    """Builtin shapes in memory (the prepare stage's `datasets` is not on the device image)."""
    images, labels = render_shapes(n, 64, seed)
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    return ImageSplit(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels), list(SHAPES_CLASSES))


def tokenizer_part(device, tmp: Path, report: dict):
    cfg = TokenizerConfig(ch=16, ch_mult=[1, 2, 4, 4], num_res_blocks=1, z_channels=64, codebook_dim=32,
                          codebook_size=256, entropy_weight=0.05)
    train, val = shapes_split(256, 0), shapes_split(64, 1)
    tcfg = TrainTokenizerConfig(steps=20, batch_size=16, checkpoint_every=10, eval_every=20, log_every=5)
    t0 = time.perf_counter()
    first = TokenizerTrainer(cfg, tcfg, 0, train.images_NCHW, device)
    for _ in range(10):                       # half the run, then a checkpoint (as if killed after it)
        first.train_step()
    first.save(tmp / "tok.pt")
    resumed = TokenizerTrainer(cfg, tcfg, 0, train.images_NCHW, device)
    check(resumed.resume(tmp / "tok.pt") and resumed.step == 10, "tokenizer resume from its checkpoint")
    resumed.fit(ckpt_path=tmp / "tok.pt")
    ev = evaluate_scales(resumed.model, val.images_NCHW, list(range(1, 9)), device, resumed.precision)
    psnr = {s: round(e.psnr, 2) for s, e in ev["per_scale"].items()}
    check(resumed.step == 20 and all(np.isfinite(list(psnr.values()))), "tokenizer trains to 20 steps with finite PSNR")
    report["tokenizer"] = {"precision": resumed.precision, "steps": resumed.step, "val_psnr": psnr,
                           "seconds": round(time.perf_counter() - t0, 1)}
    vq = resumed.model.eval()
    encode = partial(encode_images, vq, precision=resumed.precision)
    z_train, z_val = (torch.cat([z for z, _ in encode_batches(encode, s.loader(RangeBatchSampler(len(s), 64)), device)])
                      for s in (train, val))
    check(tuple(z_train.shape) == (256, 2, 32, 8, 8), f"latents shape {tuple(z_train.shape)}")
    names = list(SHAPES_CLASSES)
    return vq, LatentSplit(z_train, train.labels_N, names), LatentSplit(z_val, val.labels_N, names), val


def transformer_part(vq, train: LatentSplit, val: LatentSplit, device, tmp: Path, report: dict) -> dict:
    models = {}
    for prediction in ("gt", "residual"):
        t0 = time.perf_counter()
        cfg = TrainTransformerConfig(steps=20, batch_size=32, checkpoint_every=5, eval_every=10, log_every=5)

        def build():
            torch.manual_seed(0)
            return FlexVAR(TransformerConfig(depth=2, prediction=prediction), vq.quantize.codebook_size,
                           vq.quantize.codebook_dim, 8, pe_size=8)
        out = tmp / f"tf_{prediction}"
        first_10 = cfg.model_copy(update={"steps": 10})                    # leaves resume.pt at step 10
        train_transformer(build(), vq.quantize, train, val, first_10, ScheduleConfig(), prediction=prediction,
                          seed=0, device=device, out_dir=out)
        model = build()
        res = train_transformer(model, vq.quantize, train, val, cfg, ScheduleConfig(), prediction=prediction,
                                seed=0, device=device, out_dir=out)
        check(next(model.parameters()).device.type == device.type, f"{prediction} model on {device}")
        check(res.step == 20, f"{prediction} transformer resumed to step 20 (got {res.step})")
        report[f"transformer_{prediction}"] = {"step": res.step, "metrics": res.metrics,
                                               "seconds": round(time.perf_counter() - t0, 1)}
        models[prediction] = model.eval()
    return models


def generation_part(models: dict, vq, val, device, report: dict) -> None:
    gt = models["gt"]
    labels = torch.arange(8) % 8
    kw = dict(sampling=SamplingSettings(guidance=2.0, top_k=50, precision="auto"), seed=0, batch_size=8)

    def sched(**a):
        return resolve_schedule(train_latent_hw=(8, 8), downsample=8, **a)
    for name, schedule in {"canonical": sched(scales=[1, 2, 3, 4, 5, 6, 8]),
                           "1.5x": sched(steps=8, size_hw=(96, 96)),
                           "1:2": sched(steps=8, size_hw=(64, 128))}.items():
        for prediction, model in models.items():
            g = generate(model, vq, labels, schedule, **kw)
            h, w = schedule[-1]
            check(tuple(g.images.shape) == (8, 3, 8 * h, 8 * w) and torch.isfinite(g.images).all(),
                  f"{prediction} {name} images {tuple(g.images.shape)}")
            report.setdefault("generate", {})[f"{prediction} {name}"] = list(g.images.shape)
    images = to_unit_range(val.images_NCHW[:8])
    edits = {
        "refine": lambda: refine(gt, vq, images, labels, sched(steps=9, size_hw=(128, 128)), **kw),
        "inpaint": lambda: inpaint(gt, vq, images, box_mask((16, 16, 48, 48), (64, 64)), labels,
                                   sched(scales=[1, 2, 3, 4, 5, 6, 8]), **kw),
        "outpaint": lambda: outpaint(gt, vq, images, box_mask((16, 16, 48, 48), (64, 64)), labels,
                                     sched(scales=[1, 2, 3, 4, 5, 6, 8]), **kw),
        "extend": lambda: extend(gt, vq, images, labels, sched(steps=8, size_hw=(64, 128)), **kw),
    }
    ids_full = vq.quantize.quantize(vq.encode(images.to(device)).float(), (8, 8))[0].cpu()
    for name, run in edits.items():
        g = run()
        check(torch.isfinite(g.images).all(), f"{name} finite images")
        report.setdefault("edits", {})[name] = list(g.images.shape)
        if name == "inpaint":   # latent cells fully outside the 16..48 px box keep the image's tokens
            keep = torch.ones(8, 8, dtype=torch.bool)
            keep[2:6, 2:6] = False
            check(torch.equal(g.tokens[-1][:, keep], ids_full[:, keep]), "in-paint holds the known tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_library_check.py needs CUDA (or --device cpu to try the script itself)")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        vq, train, val, val_images = tokenizer_part(device, tmp, report)
        models = transformer_part(vq, train, val, device, tmp, report)
        with torch.no_grad():
            generation_part(models, vq, val_images, device, report)
    report["ok"] = True
    print(json.dumps(report))


if __name__ == "__main__":
    main()
