"""Make the generation figures in docs/ from one trained model (docs/generation.md shows them).

    python -m benchmarks.make_generation_figures --checkpoint models/d4 --prepared data/prepared --out docs

Writes generation_schedules.png (same classes and seed, short / canonical / long schedules),
generation_sizes.png (1x, 1.5x, 2x the training size), generation_aspect.png (1:1, 1:2, 2:1) and
generation_{refine,inpaint,outpaint,extend}.png (input row, then results), all with the
settings of params.yaml's `sample` section (cfg, top-k/top-p, greedy outside the trained scales);
optionally samples_dD_SCHEDULE.png (a sample stage's output, one row per class) and
tokenizer_recon_scales.png (the tokenizer stage's reconstructions per scale). `--zoom 4` enlarges every
image 4x (nearest), for the 16 px embedded default.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw


from flexvar.config import load_params
from flexvar.data.splits import load_split, to_uint8, to_unit_range
from flexvar.device import pick_device
from flexvar.evaluation.metrics import load_samples
from flexvar.generation.editing import box_mask, extend, inpaint, mask_overlay, outpaint, pad_center, refine
from flexvar.generation.generate import generate, resolve_schedule
from flexvar.grid import image_grid
from flexvar.transformer.checkpoint import load_flexvar_with_tokenizer

LABEL_W, PAD = 150, 4


def zoomed(images_NCHW: torch.Tensor, zoom: int) -> torch.Tensor:
    """uint8 images enlarged `zoom` times with nearest neighbours (small images stay readable, pixels exact)."""
    return images_NCHW if zoom == 1 else images_NCHW.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1)


def labeled_rows(rows: list[tuple[str, torch.Tensor]], ncol: int, zoom: int = 1) -> Image.Image:
    """One row per (label, uint8 (N, 3, H, W) images); rows may have different image sizes."""
    grids = [(label, image_grid(zoomed(imgs, zoom), ncol=ncol)) for label, imgs in rows]
    width = LABEL_W + max(g.width for _, g in grids)
    height = sum(g.height for _, g in grids) + PAD * (len(grids) - 1)
    out = Image.new("RGB", (width, height), "white")
    draw, y = ImageDraw.Draw(out), 0
    for label, g in grids:
        out.paste(g, (LABEL_W, y))
        draw.text((4, y + g.height // 2 - 6), label, fill="black")
        y += g.height + PAD
    return out


class Figures:
    def __init__(self, args):
        self.params = load_params(args.params)
        self.device = pick_device(args.device)
        self.model, self.vq, self.meta = load_flexvar_with_tokenizer(args.checkpoint, self.device)
        self.f, self.latent = int(self.meta["downsample"]), tuple(self.meta["latent_hw"])
        self.res = tuple(self.meta["resolution"])
        self.names = list(self.meta.get("class_names") or range(self.meta["num_classes"]))
        self.classes = [int(c) for c in args.classes.split(",")] if args.classes else list(range(len(self.names)))
        self.out, self.seed, self.zoom = Path(args.out), args.seed, args.zoom
        s = self.params.sample
        self.kw = dict(cfg=s.cfg, cfg_schedule=s.cfg_schedule, top_k=s.top_k, top_p=s.top_p,
                       train_side=max(self.latent), greedy_rule=s.greedy_rule, precision=s.precision)
        self.prepared = args.prepared

    def scales(self, steps=None, scales=None, size=None):
        return resolve_schedule(steps=steps, scales=scales, size_hw=size, train_latent_hw=self.latent,
                                downsample=self.f)

    def sample(self, scales, labels=None) -> torch.Tensor:
        labels = torch.tensor(self.classes) if labels is None else labels
        return to_uint8(generate(self.model, self.vq, labels, scales, seed=self.seed, **self.kw).images)

    def schedules(self):
        rows = []
        for name in ("short", "canonical", "long"):
            spec = self.params.sample.schedules[name]
            sc = resolve_schedule(steps=spec.steps, scales=spec.scales, preset=spec.preset, size_hw=spec.size,
                                  train_latent_hw=self.latent, downsample=self.f)
            rows.append((f"{name}: {len(sc)} steps\n{','.join(str(max(s)) for s in sc)}", self.sample(sc)))
        return labeled_rows(rows, ncol=len(self.classes), zoom=self.zoom)

    def sizes(self):
        H, W = self.res
        rows = []
        for mult in (1.0, 1.5, 2.0):
            size = (int(H * mult) // self.f * self.f, int(W * mult) // self.f * self.f)
            sc = self.scales(steps=min(10, max(size) // self.f), size=size)
            rows.append((f"{mult:g}x: {size[0]}x{size[1]}\n{len(sc)} steps", self.sample(sc)))
        return labeled_rows(rows, ncol=len(self.classes), zoom=self.zoom)

    def aspects(self):
        H, W = self.res
        rows = []
        for label, size in (("1:1", (H, W)), ("1:2", (H, 2 * W)), ("2:1", (2 * H, W))):
            sc = self.scales(steps=min(10, max(size) // self.f), size=size)
            rows.append((f"{label}: {size[0]}x{size[1]}", self.sample(sc)))
        return labeled_rows(rows, ncol=len(self.classes), zoom=self.zoom)

    def edit_inputs(self, n: int):
        val = load_split(self.prepared, "val")
        picks = [int((val.labels_N == c).nonzero()[0]) for c in self.classes[:n]]
        return to_unit_range(val.images_NCHW[picks]), val.labels_N[picks]

    def edits(self) -> dict[str, Image.Image]:
        n = min(len(self.classes), 6)
        images, labels = self.edit_inputs(n)
        H, W = self.res
        shown = to_uint8(images)
        hole = box_mask((W // 4, H // 4, 3 * W // 4, 3 * H // 4), (H, W))
        keep = box_mask((W // 4, H // 4, 3 * W // 4, 3 * H // 4), (H, W))
        big = (2 * H, 2 * W)
        refined = refine(self.model, self.vq, images, labels, self.scales(steps=min(10, max(big) // self.f), size=big),
                         seed=self.seed, **self.kw)
        painted = inpaint(self.model, self.vq, images, hole, labels, self.scales(steps=min(10, max(self.latent))),
                          seed=self.seed, **self.kw)
        outp = outpaint(self.model, self.vq, images, keep, labels, self.scales(steps=min(10, max(self.latent))),
                        seed=self.seed, **self.kw)
        wide = (H, 2 * W)
        ext = extend(self.model, self.vq, images, labels, self.scales(steps=min(10, max(wide) // self.f), size=wide),
                     seed=self.seed, **self.kw)
        up = torch.nn.functional.interpolate(shown.float(), size=big, mode="nearest").to(torch.uint8)
        return {
            "refine": labeled_rows([("input (nearest 2x)", up), (f"refined {big[0]}x{big[1]}",
                                                                  to_uint8(refined.images))], ncol=n, zoom=self.zoom),
            "inpaint": labeled_rows([("input, hole dark", mask_overlay(shown, hole)),
                                     ("in-painted", to_uint8(painted.images))], ncol=n, zoom=self.zoom),
            "outpaint": labeled_rows([("input, regenerated dark", mask_overlay(shown, ~keep)),
                                      ("out-painted", to_uint8(outp.images))], ncol=n, zoom=self.zoom),
            "extend": labeled_rows([("input", pad_center(shown, wide)),
                                    (f"extended {wide[0]}x{wide[1]}", to_uint8(ext.images))], ncol=n, zoom=self.zoom),
        }

    def samples(self, npz: str, per_class: int = 8) -> Image.Image:
        """The first `per_class` images of each class of a `sample` stage's samples.npz, one row per class."""
        images_NCHW, labels_N = load_samples(npz)
        rows = [(str(self.names[c]), images_NCHW[(labels_N == c).nonzero().flatten()[:per_class]])
                for c in self.classes]
        return labeled_rows(rows, ncol=per_class, zoom=self.zoom)

    def save(self, name: str, img: Image.Image) -> None:
        path = self.out / f"generation_{name}.png"
        img.save(path)
        print(f"wrote {path} ({img.width}x{img.height})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--classes", default=None, help="class ids to show (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--samples", nargs="*", default=[], metavar="D/SCHEDULE",
                    help="also write samples_dD_SCHEDULE.png from samples/dD/SCHEDULE/samples.npz, one row per class")
    ap.add_argument("--tokenizer-plot", default=None, metavar="PNG",
                    help="also write tokenizer_recon_scales.png: the train_tokenizer stage's recon_scales.png, zoomed")
    ap.add_argument("--zoom", type=int, default=1, help="enlarge every image N times, nearest (e.g. 4 for 16 px)")
    args = ap.parse_args(argv)
    fig = Figures(args)
    fig.out.mkdir(parents=True, exist_ok=True)
    fig.save("schedules", fig.schedules())
    fig.save("sizes", fig.sizes())
    fig.save("aspect", fig.aspects())
    for name, img in fig.edits().items():
        fig.save(name, img)
    for variant in args.samples:
        img = fig.samples(f"samples/{variant}/samples.npz")
        img.save(fig.out / f"samples_{variant.replace('/', '_')}.png")
    if args.tokenizer_plot:
        recon = Image.open(args.tokenizer_plot)
        recon.resize((recon.width * fig.zoom, recon.height * fig.zoom), Image.Resampling.NEAREST).save(
            fig.out / "tokenizer_recon_scales.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
