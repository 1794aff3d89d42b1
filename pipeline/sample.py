"""DVC stage `sample@d{depth}-{schedule}`: class-conditional samples of one model with one schedule.

    python -m pipeline.sample --params params.yaml --depth 2 --schedule canonical \
        --model models/d2 --out samples/d2/canonical

Writes OUT/samples.npz (`arr_0` uint8 (N, H, W, 3) — the OpenAI ADM evaluator's layout — and
`labels` int64 (N,); uncompressed, streamed batch by batch so 50,000 samples need one batch of
memory), OUT/images/{i:05d}_c{label}.png, OUT/grid.png (one row per class) and OUT/info.json
(schedule, size, timing). `sample.per_class` images per class, settings from `sample`
(schedule `sample.schedules[SCHEDULE]`), seeded from `seed`.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
from einops import rearrange

from pipeline.common import set_offline_env, setup_torch, stage_args, write_json

set_offline_env()

from flexvar.checkpoint import CheckpointError  # noqa: E402
from flexvar.config import ConfigError, load_params  # noqa: E402
from flexvar.data.splits import to_uint8  # noqa: E402
from flexvar.generation.generate import ScheduleError, class_labels, generate_batches, resolve_schedule  # noqa: E402
from flexvar.grid import class_grid  # noqa: E402
from flexvar.transformer.checkpoint import load_flexvar_with_tokenizer  # noqa: E402
from pipeline.tracking import TrackingError, stage_run  # noqa: E402

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
    spec = params.sample.schedules[name]
    try:
        return resolve_schedule(steps=spec.steps, scales=spec.scales, preset=spec.preset,
                                size_hw=tuple(spec.size) if spec.size else None,
                                train_latent_hw=tuple(meta["latent_hw"]), downsample=int(meta["downsample"]))
    except ScheduleError as e:
        raise ConfigError(f"sample.schedules.{name}: {e}") from None


class SampleWriter:
    """Writes samples batch by batch with memory bounded by the batch: samples.npz (ADM layout, arr_0
    streamed into an uncompressed zip member, then labels), one PNG per image, and a per-class grid
    from the first GRID_PER_CLASS images of each class."""

    def __init__(self, out: Path, labels_N, class_names: list[str]):
        from flexvar.data.arrays import NpzWriter

        if out.exists():
            shutil.rmtree(out)
        (out / "images").mkdir(parents=True)
        self.out, self.labels_N, self.class_names = out, labels_N, class_names
        self.npz, self.arr, self.stream, self.n = NpzWriter(out / "samples.npz"), None, None, 0
        self.per_class = min(GRID_PER_CLASS, int(labels_N.bincount().max())) if len(labels_N) else 1
        self.shown: dict[int, list] = {}

    def write(self, images_uint8_B3HW, labels_B) -> None:
        from PIL import Image

        arr_BHW3 = rearrange(images_uint8_B3HW, "b c h w -> b h w c").numpy()
        if self.arr is None:
            self.arr, self.stream = self.npz.member("arr_0", (len(self.labels_N), *arr_BHW3.shape[1:]), np.uint8)
        self.arr.write(arr_BHW3)
        for img, lab, img_3HW in zip(arr_BHW3, labels_B.tolist(), images_uint8_B3HW):
            Image.fromarray(img).save(self.out / "images" / f"{self.n:05d}_c{lab}.png")
            shown = self.shown.setdefault(lab, [])
            if len(shown) < self.per_class:
                shown.append(img_3HW)
            self.n += 1

    def close(self) -> None:
        import torch

        self.arr.close()
        self.stream.close()
        labels, stream = self.npz.member("labels", (len(self.labels_N),), np.int64)
        labels.write(self.labels_N.numpy().astype(np.int64))
        labels.close()
        stream.close()
        self.npz.close()
        kept = [(lab, img) for lab in sorted(self.shown) for img in self.shown[lab]]
        class_grid(torch.stack([img for _, img in kept]), torch.tensor([lab for lab, _ in kept]), self.class_names,
                   per_class=self.per_class).save(self.out / "grid.png")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    d, name = args.depth, args.schedule
    model_dir, out = Path(args.model or f"models/d{d}"), Path(args.out or f"samples/d{d}/{name}")
    try:
        params = load_params(args.params)
        device = setup_torch(params)
        cfg = params.sample
        model, vqvae, meta = load_flexvar_with_tokenizer(model_dir, device)
        scales = schedule_of(params, name, meta)
        class_names = list(meta.get("class_names") or [str(c) for c in range(meta["num_classes"])])
        labels = class_labels(meta["num_classes"], cfg.per_class)
        with stage_run("sample", params, PARAM_KEYS, variant=f"d{d}/{name}") as log:
            t0 = time.perf_counter()
            writer = SampleWriter(out, labels, class_names)
            for part in generate_batches(model, vqvae, labels, scales, batch_size=cfg.batch_size, seed=params.seed,
                                         cfg=cfg.cfg, cfg_schedule=cfg.cfg_schedule, top_k=cfg.top_k,
                                         top_p=cfg.top_p, train_side=max(meta["latent_hw"]),
                                         greedy_outside=cfg.greedy_outside, precision=cfg.precision, progress=True):
                images = to_uint8(part.images)     # one batch: written, then dropped
                writer.write(images, part.labels)
            writer.close()
            seconds = time.perf_counter() - t0
            info = {"depth": d, "schedule": name, "scales": [list(s) for s in scales], "steps": len(scales),
                    "size": list(part.images.shape[-2:]), "num_images": len(labels), "seconds": seconds,
                    "images_per_s": len(labels) / seconds, "device": str(device), "precision": cfg.precision}
            write_json(out / "info.json", info)
            log.log_metrics({"images_per_s": info["images_per_s"], "sample_seconds": seconds,
                             "num_images": len(labels), "steps": len(scales)})
            log.log_artifact(out / "grid.png")
            log.log_artifact(out / "info.json")
    except (ConfigError, CheckpointError, TrackingError, FileNotFoundError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    print(f"sample: d{d}/{name}: {info['num_images']} images {info['size'][0]}x{info['size'][1]} "
          f"({len(scales)} steps) in {seconds:.1f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
