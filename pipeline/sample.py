"""DVC stage `sample@d{depth}-{schedule}`: class-conditional samples of one model with one schedule.

    python -m pipeline.sample --params params.yaml --depth 2 --schedule canonical \
        --model models/d2 --out samples/d2/canonical

Writes OUT/samples.npz (`arr_0` uint8 (N, H, W, 3) — the OpenAI ADM evaluator's layout — and
`labels` int64 (N,)), OUT/images/{i:05d}_c{label}.png, OUT/grid.png (one row per class) and
OUT/info.json (schedule, size, timing). `sample.per_class` images per class, settings from
`sample` (schedule `sample.schedules[SCHEDULE]`), seeded from `seed`.
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
from flexvar.generation.generate import ScheduleError, class_labels, generate, resolve_schedule  # noqa: E402
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


def write_samples(out: Path, images_uint8_N3HW, labels_N, class_names: list[str]) -> None:
    """samples.npz (ADM layout), one PNG per image, a per-class grid."""
    from PIL import Image

    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    arr_NHW3 = rearrange(images_uint8_N3HW, "n c h w -> n h w c").numpy()
    np.savez(out / "samples.npz", arr_0=arr_NHW3, labels=labels_N.numpy().astype(np.int64))
    for i, (img, lab) in enumerate(zip(arr_NHW3, labels_N.tolist())):
        Image.fromarray(img).save(out / "images" / f"{i:05d}_c{lab}.png")
    per_class = min(GRID_PER_CLASS, int(labels_N.bincount().max()))
    class_grid(images_uint8_N3HW, labels_N, class_names, per_class=per_class).save(out / "grid.png")


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
            result = generate(model, vqvae, labels, scales, batch_size=cfg.batch_size, seed=params.seed,
                              cfg=cfg.cfg, cfg_schedule=cfg.cfg_schedule, top_k=cfg.top_k, top_p=cfg.top_p,
                              train_side=max(meta["latent_hw"]), greedy_rule=cfg.greedy_rule,
                              precision=cfg.precision, progress=True)
            seconds = time.perf_counter() - t0
            images = to_uint8(result.images)
            write_samples(out, images, result.labels, class_names)
            info = {"depth": d, "schedule": name, "scales": [list(s) for s in scales], "steps": len(scales),
                    "size": list(images.shape[-2:]), "num_images": len(images), "seconds": seconds,
                    "images_per_s": len(images) / seconds, "device": str(device), "precision": cfg.precision,
                    "cfg": cfg.cfg, "cfg_schedule": cfg.cfg_schedule, "top_k": cfg.top_k, "top_p": cfg.top_p,
                    "greedy_rule": cfg.greedy_rule}
            write_json(out / "info.json", info)
            log.log_metrics({"images_per_s": info["images_per_s"], "sample_seconds": seconds,
                             "num_images": len(images), "steps": len(scales)})
            log.log_artifact(out / "grid.png")
            log.log_artifact(out / "info.json")
    except (ConfigError, CheckpointError, TrackingError, FileNotFoundError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        return 2
    print(f"sample: d{d}/{name}: {len(images)} images {images.shape[-2]}x{images.shape[-1]} "
          f"({len(scales)} steps) in {seconds:.1f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
