"""Paper Fig. 3 at our scale: val PSNR per scale of a multi-scale tokenizer (K=5) vs one trained
only at the full scale (K=1), same steps. Reads two `train_tokenizer` stage outputs and writes a
markdown table and an image grid.

    python -m benchmarks.tokenizer_scales --multi RUN_K5 --single RUN_K1 --data data/prepared \
        --out-md docs/tokenizer_scales.md --out-png docs/tokenizer_scales.png

RUN_* are folders holding the stage's outputs (models/tokenizer, metrics/tokenizer.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


from flexvar.data.splits import load_split
from flexvar.tokenizer.vqvae import load_tokenizer
from flexvar.tokenizer.training import recon_grid


def table(multi: dict, single: dict) -> str:
    scales = sorted(multi["psnr"], key=int)
    head = "| scale (latent) | " + " | ".join(f"{s}x{s}" for s in scales) + " | mean |"
    sep = "|" + "---|" * (len(scales) + 2)
    rows = []
    for name, m in (("K=5 (multi-scale)", multi), ("K=1 (full scale only)", single)):
        rows.append(f"| {name} | " + " | ".join(f"{m['psnr'][s]:.2f}" for s in scales) + f" | {m['psnr_mean']:.2f} |")
    diff = " | ".join(f"{multi['psnr'][s] - single['psnr'][s]:+.2f}" for s in scales)
    rows.append(f"| K=5 minus K=1 | {diff} | {multi['psnr_mean'] - single['psnr_mean']:+.2f} |")
    return "\n".join([head, sep, *rows])


def summary(multi: dict, single: dict) -> str:
    """What the table shows, read off the figures (not written in advance)."""
    scales = sorted(multi["psnr"], key=int)
    diff = {s: multi["psnr"][s] - single["psnr"][s] for s in scales}
    wins = sum(d > 0 for d in diff.values())
    coarse, full = scales[0], scales[-1]
    spread = {k: max(m["psnr"].values()) - min(m["psnr"].values()) for k, m in (("K=5", multi), ("K=1", single))}
    return (f"K=5 is better than K=1 at {wins} of {len(scales)} scales; the margin is {diff[coarse]:+.2f} dB "
            f"at {coarse}x{coarse} and {diff[full]:+.2f} dB at the full {full}x{full}. Best-to-worst spread "
            f"across scales: K=5 {spread['K=5']:.2f} dB, K=1 {spread['K=1']:.2f} dB.")


def document(metrics: dict, args: argparse.Namespace) -> str:
    m, k1 = metrics["multi"], metrics["single"]
    return f"""# Tokenizer reconstruction at every scale: multi-scale (K=5) vs full-scale-only (K=1)

The paper's Fig. 3 claim at our scale: a VQVAE trained with K random scales per batch (always
including the full size) reconstructs well at every scale, one trained only at the full scale
(K=1) degrades at the coarse scales it never saw. Both runs: the same `params.yaml` with
`train_tokenizer.steps` = {m['steps']}, differing only in `train_tokenizer.num_scales`; val PSNR (dB)
on {m['val_images']} val images, each scale compared with the input area-resized to that scale's resolution.

{table(m, k1)}

{summary(m, k1)}
Codebook usage over all scales: K=5 {m['codebook_usage']:.3f} (perplexity {m['codebook_perplexity']:.0f}),
K=1 {k1['codebook_usage']:.3f} (perplexity {k1['codebook_perplexity']:.0f}).

![rows: each val image reconstructed by K=5 then K=1; columns: input, scales 1..8](tokenizer_scales.png)

Reproduce: run `python -m pipeline.train_tokenizer` twice (`num_scales: 5` and `1`) into two folders,
then `python -m benchmarks.tokenizer_scales --multi RUN_K5 --single RUN_K1 --data data/prepared`.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--multi", required=True, type=Path)
    ap.add_argument("--single", required=True, type=Path)
    ap.add_argument("--data", default="data/prepared")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--out-md", default="docs/tokenizer_scales.md")
    ap.add_argument("--out-png", default="docs/tokenizer_scales.png")
    args = ap.parse_args(argv)
    from torchvision.utils import save_image

    metrics = {k: json.loads((d / "metrics/tokenizer.json").read_text()) for k, d in
               (("multi", args.multi), ("single", args.single))}
    val = load_split(args.data, "val").images_NCHW[: args.images]
    grids = []
    for run in (args.multi, args.single):
        model = load_tokenizer(run / "models/tokenizer")
        full = val.shape[-1] // model.downsample
        grids.append(recon_grid(model, val, list(range(1, full + 1)), torch.device("cpu")))
    H = val.shape[-2]
    rows = []          # interleave: image i with K=5, then image i with K=1
    for i in range(args.images):
        rows += [grids[0][:, i * H:(i + 1) * H], grids[1][:, i * H:(i + 1) * H]]
    Path(args.out_png).parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(rows, dim=1).float() / 255, args.out_png)
    Path(args.out_md).write_text(document(metrics, args))
    print(table(metrics["multi"], metrics["single"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
