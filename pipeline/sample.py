"""DVC stage `sample@d{depth}-{schedule}`: class-conditional samples of one model with one schedule.

    python -m pipeline.sample --params params.yaml --depth 2 --schedule canonical \
        --model models/d2 --out samples/d2/canonical

Writes OUT/samples.npz (`arr_0` uint8 (N, H, W, 3) — the OpenAI ADM evaluator's layout — and
`labels` int64 (N,); uncompressed, streamed so 50,000 samples need one batch of memory),
OUT/images/{i:05d}_c{label}.png, OUT/grid.png (one row per shown class: at most GRID_MAX_CLASSES
classes chosen evenly, GRID_PER_CLASS images each) and OUT/info.json (schedule, size, timing, grid,
and `sampling`: the SamplingSettings the images were drawn with, as generation took them).
`sample.per_class` images per class, settings from `sample` (schedule `sample.schedules[SCHEDULE]`),
seeded from `seed`. The memory check counts one batch (the stage streams batches) plus what is kept
for the whole run (`SampleWriter.held_bytes`: labels, grid), so the paper's 50 samples x 1000
classes cost one batch, not 50,000 images.

Resumable: finished batches are kept in a progress folder beside OUT (`.{OUT name}.partial`, not one
of the stage's outs, so `dvc repro` and the flow leave it alone) with the random generator's state
after each batch. A run stopped anywhere (Ctrl-C, a killed job, a preempted node) continues at the
next batch when the stage runs again with the same model and settings, and writes the same files an
uninterrupted run writes; with other settings it starts over. OUT appears only when every batch is done.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from einops import rearrange

from pipeline.common import setup_torch, stage_args, write_json

from flexvar.config import ConfigError, load_params
from flexvar.data.splits import to_uint8
from flexvar.errors import about, command
from flexvar.generation.generate import class_labels, generate_batches, make_generator
from flexvar.generation.memory import check_generation_memory
from flexvar.grid import GRID_MAX_CLASSES, class_grid, class_grid_size, shown_classes
from flexvar.outputs import check_out_dir, replace_dir
from flexvar.checkpoint import file_sha256
from flexvar.schedules import ScheduleError, spec_scales
from flexvar.transformer.checkpoint import flexvar_path, load_flexvar_with_tokenizer
from pipeline.tracking import stage_run

PARAM_KEYS = ["seed", "sample.per_class", "sample.batch_size", "sample.guidance", "sample.guidance_schedule", "sample.top_k",
              "sample.top_p", "sample.precision", "sample.greedy_rule", "sample.max_memory_gb"]   # + its schedule
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
    """Writes samples batch by batch into the progress folder `partial`, memory bounded by the batch:
    batch b as shards/{b:05d}.npy (uint8, ADM layout) and one PNG per image in images/. `close(out)`
    assembles the stage's folder: samples.npz (arr_0 streamed shard by shard, then labels), the PNGs
    (hard-linked) and a class grid from the first GRID_PER_CLASS images of at most GRID_MAX_CLASSES evenly
    chosen classes (`held_bytes`). `start` batches of `batch_size` are already in `partial` (a resumed run)."""

    def __init__(self, partial: Path, labels_N, class_names: list[str], batch_size: int, start: int = 0):
        for sub in ("shards", "images"):
            (partial / sub).mkdir(parents=True, exist_ok=True)
        self.partial, self.labels_N, self.class_names = partial, labels_N, class_names
        self.batch, self.n = start, min(start * batch_size, len(labels_N))     # next batch, images so far
        self.per_class = min(GRID_PER_CLASS, int(labels_N.bincount().max())) if len(labels_N) else 1

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
        for img, lab in zip(arr_BHW3, labels_B.tolist()):
            Image.fromarray(img).save(self.partial / "images" / f"{self.n:05d}_c{lab}.png")
            self.n += 1
        shard = self.partial / "shards" / f"{self.batch:05d}.npy"
        with open(shard.with_suffix(".tmp"), "wb") as f:      # whole or absent: a crash leaves no half shard
            np.save(f, arr_BHW3)
        os.replace(shard.with_suffix(".tmp"), shard)
        self.batch += 1

    def close(self, out: Path) -> dict:
        """Assemble OUT from the finished batches; return what the grid shows."""
        import torch

        from flexvar.data.arrays import NpzWriter

        npz, arr, stream, at = NpzWriter(out / "samples.npz"), None, None, 0
        self.kept = kept = {c: [] for c in shown_classes(len(self.class_names))}   # the grid's images
        for b in range(self.batch):
            arr_BHW3 = np.load(self.partial / "shards" / f"{b:05d}.npy")
            if arr is None:
                arr, stream = npz.member("arr_0", (len(self.labels_N), *arr_BHW3.shape[1:]), np.uint8)
            arr.write(arr_BHW3)
            for img, lab in zip(arr_BHW3, self.labels_N[at:at + len(arr_BHW3)].tolist()):
                if lab in kept and len(kept[lab]) < self.per_class:
                    kept[lab].append(torch.from_numpy(rearrange(img, "h w c -> c h w").copy()))  # its own pixels
            at += len(arr_BHW3)
        arr.close()
        stream.close()
        labels, stream = npz.member("labels", (len(self.labels_N),), np.int64)
        labels.write(self.labels_N.numpy().astype(np.int64))
        labels.close()
        stream.close()
        npz.close()
        (out / "images").mkdir()
        for png in sorted((self.partial / "images").iterdir()):   # linked: a failure here loses no finished batch
            os.link(png, out / "images" / png.name)
        shown = [(lab, img) for lab in kept for img in kept[lab]]
        class_grid(torch.stack([img for _, img in shown]), torch.tensor([lab for lab, _ in shown]), self.class_names,
                   per_class=self.per_class, classes=list(kept)).save(out / "grid.png")
        return {"classes": list(kept), "per_class": self.per_class, "kept_images": len(shown)}


def progress_dir(out: Path) -> Path:
    """Where a run keeps its finished batches until it is complete: a hidden sibling of OUT."""
    return out.parent / f".{out.name}.partial"


def load_progress(partial: Path, fingerprint: dict) -> dict | None:
    """The saved progress of an earlier run with this fingerprint; None (and `partial` cleared) otherwise."""
    import torch

    state_file = partial / "state.pt"
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)
        if state.get("fingerprint") == fingerprint:
            return state
        print(f"sample: {partial} holds batches of other settings or another model; starting over", flush=True)
    shutil.rmtree(partial, ignore_errors=True)
    return None


def save_progress(partial: Path, state: dict) -> None:
    import torch

    torch.save(state, partial / "state.tmp")
    os.replace(partial / "state.tmp", partial / "state.pt")     # the old state or the new one, never half


def check_memory(cfg, name: str, model, vqvae, scales, num_images: int, num_classes: int) -> int:
    """Refuse (before allocating) a run whose one batch plus what it keeps is above sample.max_memory_gb."""
    h, w = scales[-1]
    f = vqvae.cfg.downsample
    held = SampleWriter.held_bytes(num_images, num_classes, (h * f, w * f))
    return check_generation_memory(model, vqvae, scales, min(cfg.batch_size, num_images), cfg.guidance > 0,
                                   cfg.max_memory_gb, what=f"sample.schedules.{name} with sample.batch_size "
                                   f"{cfg.batch_size}", setting="sample.max_memory_gb", held_bytes=held)


@command("sample")
def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    d, name = args.depth, args.schedule
    model_dir, out = Path(args.model or f"models/d{d}"), Path(args.out or f"samples/d{d}/{name}")
    keys = PARAM_KEYS + [f"sample.schedules.{name}"]   # what this stage reads, checked and logged
    params = load_params(args.params, uses=keys)
    check_out_dir(out)
    device = setup_torch(params)
    cfg, sampling = params.sample, params.sample.sampling
    with about("--model"):
        model, vqvae, meta = load_flexvar_with_tokenizer(model_dir, device)
    scales = schedule_of(params, name, meta)
    class_names = list(meta.get("class_names") or [str(c) for c in range(meta["num_classes"])])
    labels = class_labels(meta["num_classes"], cfg.per_class)
    memory = check_memory(cfg, name, model, vqvae, scales, len(labels), len(class_names))
    h, w = scales[-1]
    size = [h * vqvae.cfg.downsample, w * vqvae.cfg.downsample]
    model_sha = file_sha256(flexvar_path(model_dir))
    fingerprint = {"model_sha256": model_sha, "tokenizer_sha256": meta.get("tokenizer_sha256"),
                   "scales": [list(s) for s in scales], "sampling": sampling.model_dump(mode="json"),
                   "seed": params.seed, "num_images": len(labels), "batch_size": cfg.batch_size,
                   "device": device.type}
    partial = progress_dir(out)
    state = load_progress(partial, fingerprint)
    gen, start, before = make_generator(params.seed, device), 0, 0.0
    if state is not None:
        gen.set_state(state["generator"])
        start, before = state["next_batch"], state["seconds"]
        print(f"sample: resuming at batch {start} ({state['images']} of {len(labels)} images done) "
              f"from {partial}", flush=True)
    with stage_run("sample", params, keys, variant=f"d{d}/{name}") as log:
        t0 = time.perf_counter()
        writer = SampleWriter(partial, labels, class_names, cfg.batch_size, start)
        for part in generate_batches(model, vqvae, labels, scales, sampling, batch_size=cfg.batch_size,
                                     seed=params.seed, train_side=max(meta["latent_hw"]), progress=True,
                                     start=start, generator=gen):
            writer.write(to_uint8(part.images), part.labels)     # one batch: written, then dropped
            save_progress(partial, {"fingerprint": fingerprint, "next_batch": writer.batch, "images": writer.n,
                                    "generator": gen.get_state(), "seconds": before + time.perf_counter() - t0})
        with replace_dir(out, "sample") as tmp:
            grid = writer.close(tmp)
            seconds = before + time.perf_counter() - t0
            info = {"depth": d, "schedule": name, "scales": [list(s) for s in scales], "steps": len(scales),
                    "size": size, "num_images": len(labels), "seconds": seconds,
                    "images_per_s": len(labels) / seconds, "device": str(device),
                    "sampling": sampling.model_dump(mode="json"), "grid": grid, "resumed_at_batch": start,
                    "memory_estimate_gb": memory / 1024 ** 3,
                    "model_sha256": model_sha}   # evaluate tags the registered version
            write_json(tmp / "info.json", info)
        shutil.rmtree(partial)
        log.log_metrics({"images_per_s": info["images_per_s"], "sample_seconds": seconds,
                         "num_images": len(labels), "steps": len(scales)})
        log.log_artifact(out / "grid.png")
        log.log_artifact(out / "info.json")
    print(f"sample: d{d}/{name}: {info['num_images']} images {info['size'][0]}x{info['size'][1]} "
          f"({len(scales)} steps) in {seconds:.1f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
