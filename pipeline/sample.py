"""DVC stage `sample@d{depth}-{schedule}`: class-conditional samples of one model with one schedule.

    python -m pipeline.sample --params params.yaml --depth 2 --schedule canonical \
        --model models/d2 --out samples/d2/canonical

Writes OUT/samples.npz (`arr_0` uint8 (N, H, W, 3) — the OpenAI ADM evaluator's layout — and
`labels` int64 (N,); uncompressed, streamed batch by batch so 50,000 samples need one batch of
memory), OUT/images/{i:05d}_c{label}.png, OUT/grid.png (one row per shown class: at most
GRID_MAX_CLASSES classes chosen evenly, GRID_PER_CLASS images each) and OUT/info.json (schedule,
size, timing, grid). `sample.per_class` images per class, settings from `sample` (schedule
`sample.schedules[SCHEDULE]`), seeded from `seed`. The memory check counts one batch (the stage
streams batches) plus what is kept for the whole run (`SampleWriter.held_bytes`: labels, grid), so
the paper's 50 samples x 1000 classes cost one batch, not 50,000 images.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from einops import rearrange

from pipeline.common import setup_torch, stage_args, write_json

from flexvar.config import ConfigError, load_params
from flexvar.data.splits import to_uint8
from flexvar.errors import about, command
from flexvar.generation.generate import ScheduleError, class_labels, generate_batches, spec_scales
from flexvar.generation.memory import check_generation_memory
from flexvar.grid import GRID_MAX_CLASSES, class_grid, class_grid_size, shown_classes
from flexvar.outputs import check_out_dir, replace_dir
from flexvar.transformer.checkpoint import load_flexvar_with_tokenizer
from pipeline.tracking import stage_run

PARAM_KEYS = ["seed", "sample"]
GRID_PER_CLASS = 8


def parse(argv):
    return stage_args(__doc__, argv,
                      depth={"type": int, "required": True, "help": "transformer depth (one of variants.depths)"},
                      schedule={"required": True, "help": "a schedule name in sample.schedules"},
                      model={"default": None, "help": "model folder (default models/d{depth})"},
                      out={"default": None, "help": "output folder (default samples/d{depth}/{schedule})"})


def schedule_of(params, name: str, meta: dict):
    """(h, w) scales of the named schedule for this checkpoint's latent and downsampling."""
    if name not in params.sample.schedules:
        raise ConfigError(f"schedule {name!r} is not in sample.schedules ({', '.join(params.sample.schedules)})")
    try:
        return spec_scales(params.sample.schedules[name], meta["latent_hw"], int(meta["downsample"]))
    except ScheduleError as e:
        raise ConfigError(f"sample.schedules.{name}: {e}") from None


class SampleWriter:
    """Writes samples batch by batch into a new, empty folder with memory bounded by the batch: samples.npz (ADM layout, arr_0
    streamed into an uncompressed zip member, then labels), one PNG per image, and a class grid from
    the first GRID_PER_CLASS images of at most GRID_MAX_CLASSES evenly chosen classes (`held_bytes`)."""

    def __init__(self, out: Path, labels_N, class_names: list[str]):
        from flexvar.data.arrays import NpzWriter

        (out / "images").mkdir(parents=True)     # `out` is the stage's fresh temp folder
        self.out, self.labels_N, self.class_names = out, labels_N, class_names
        self.npz, self.arr, self.stream, self.n = NpzWriter(out / "samples.npz"), None, None, 0
        self.per_class = min(GRID_PER_CLASS, int(labels_N.bincount().max())) if len(labels_N) else 1
        self.kept: dict[int, list] = {c: [] for c in shown_classes(len(class_names))}   # the grid's images

    @staticmethod
    def held_bytes(num_images: int, num_classes: int, image_hw: tuple[int, int]) -> int:
        """Bytes kept for the whole run besides one batch: the int64 labels (the tensor and the copy written
        at close: 16 bytes an image), the grid's kept uint8 images and the grid (its rows, tensor and PIL image)."""
        h, w = image_hw
        rows = min(num_classes, GRID_MAX_CLASSES)
        grid_h, grid_w = class_grid_size(rows, GRID_PER_CLASS, h, w)
        return 16 * num_images + rows * GRID_PER_CLASS * 3 * h * w + 3 * 3 * grid_h * grid_w

    def write(self, images_uint8_B3HW, labels_B) -> None:
        from PIL import Image

        arr_BHW3 = rearrange(images_uint8_B3HW, "b c h w -> b h w c").numpy()
        if self.arr is None:
            self.arr, self.stream = self.npz.member("arr_0", (len(self.labels_N), *arr_BHW3.shape[1:]), np.uint8)
        self.arr.write(arr_BHW3)
        for img, lab, img_3HW in zip(arr_BHW3, labels_B.tolist(), images_uint8_B3HW):
            Image.fromarray(img).save(self.out / "images" / f"{self.n:05d}_c{lab}.png")
            kept = self.kept.get(lab)
            if kept is not None and len(kept) < self.per_class:
                kept.append(img_3HW.clone())     # its own pixels: a view would keep the whole batch alive
            self.n += 1

    def close(self) -> dict:
        """Finish samples.npz, draw grid.png; return what the grid shows."""
        import torch

        self.arr.close()
        self.stream.close()
        labels, stream = self.npz.member("labels", (len(self.labels_N),), np.int64)
        labels.write(self.labels_N.numpy().astype(np.int64))
        labels.close()
        stream.close()
        self.npz.close()
        kept = [(lab, img) for lab in self.kept for img in self.kept[lab]]
        class_grid(torch.stack([img for _, img in kept]), torch.tensor([lab for lab, _ in kept]), self.class_names,
                   per_class=self.per_class, classes=list(self.kept)).save(self.out / "grid.png")
        return {"classes": list(self.kept), "per_class": self.per_class, "kept_images": len(kept)}


def check_memory(cfg, name: str, model, vqvae, scales, num_images: int, num_classes: int) -> int:
    """Refuse (before allocating) a run whose one batch plus what it keeps is above sample.max_memory_gb."""
    h, w = scales[-1]
    f = vqvae.cfg.downsample
    held = SampleWriter.held_bytes(num_images, num_classes, (h * f, w * f))
    return check_generation_memory(model, vqvae, scales, min(cfg.batch_size, num_images), cfg.cfg > 0,
                                   cfg.max_memory_gb, what=f"sample.schedules.{name} with sample.batch_size "
                                   f"{cfg.batch_size}", setting="sample.max_memory_gb", held_bytes=held)


@command("sample")
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    d, name = args.depth, args.schedule
    model_dir, out = Path(args.model or f"models/d{d}"), Path(args.out or f"samples/d{d}/{name}")
    params = load_params(args.params)
    check_out_dir(out)
    device = setup_torch(params)
    cfg = params.sample
    with about("--model"):
        model, vqvae, meta = load_flexvar_with_tokenizer(model_dir, device)
    scales = schedule_of(params, name, meta)
    class_names = list(meta.get("class_names") or [str(c) for c in range(meta["num_classes"])])
    labels = class_labels(meta["num_classes"], cfg.per_class)
    memory = check_memory(cfg, name, model, vqvae, scales, len(labels), len(class_names))
    with stage_run("sample", params, PARAM_KEYS, variant=f"d{d}/{name}") as log:
        t0 = time.perf_counter()
        with replace_dir(out, "sample") as tmp:
            writer = SampleWriter(tmp, labels, class_names)
            for part in generate_batches(model, vqvae, labels, scales, batch_size=cfg.batch_size, seed=params.seed,
                                         cfg=cfg.cfg, cfg_schedule=cfg.cfg_schedule, top_k=cfg.top_k,
                                         top_p=cfg.top_p, train_side=max(meta["latent_hw"]),
                                         greedy_rule=cfg.greedy_rule, precision=cfg.precision, progress=True):
                writer.write(to_uint8(part.images), part.labels)     # one batch: written, then dropped
            grid = writer.close()
            seconds = time.perf_counter() - t0
            info = {"depth": d, "schedule": name, "scales": [list(s) for s in scales], "steps": len(scales),
                    "size": list(part.images.shape[-2:]), "num_images": len(labels), "seconds": seconds,
                    "images_per_s": len(labels) / seconds, "device": str(device), "precision": cfg.precision,
                    "cfg": cfg.cfg, "cfg_schedule": cfg.cfg_schedule, "top_k": cfg.top_k, "top_p": cfg.top_p,
                    "greedy_rule": cfg.greedy_rule, "grid": grid, "memory_estimate_gb": memory / 1024 ** 3}
            write_json(tmp / "info.json", info)
        log.log_metrics({"images_per_s": info["images_per_s"], "sample_seconds": seconds,
                         "num_images": len(labels), "steps": len(scales)})
        log.log_artifact(out / "grid.png")
        log.log_artifact(out / "info.json")
    print(f"sample: d{d}/{name}: {info['num_images']} images {info['size'][0]}x{info['size'][1]} "
          f"({len(scales)} steps) in {seconds:.1f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
