"""DVC stage `extract_latents`: frozen tokenizer encoder over the views of every image -> data/latents.

    python -m pipeline.extract_latents --params params.yaml --prepared data/prepared \
        --tokenizer models/tokenizer --out data/latents

Images are read batch by batch (decoded in `data.num_workers` DataLoader workers when the split
is streamed) and the latents appended to memory-mappable shards in `data.latent_dtype`
(flexvar/data/latent_cache.py): memory is bounded by the batch, not by the dataset.
Views (`data.augment`): center = the centre crop and its flip; official = `data.augment_views`
official random crops + flips of each train image, seeded by (seed, image, view) (flexvar/data/augment.py);
the val split is always centre crop + flip (val loss on the centre crop, as official evaluation).
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

from pipeline.common import setup_torch, stage_args, write_json

from flexvar.checkpoint import file_sha256
from flexvar.config import load_params
from flexvar.data.augment import views_loader
from flexvar.data.latent_cache import extract_split
from flexvar.data.sampling import RangeBatchSampler
from flexvar.data.splits import SplitError, load_split, load_stats
from flexvar.errors import about, command
from flexvar.outputs import check_in_dir, check_out_dir, replace_dir
from flexvar.tokenizer.bf16_copy import encode_images
from flexvar.tokenizer.vqvae import load_tokenizer, tokenizer_path
from pipeline.tracking import stage_run

PARAM_KEYS = ["seed", "tokenizer", "data.latent_dtype", "data.resolution", "data.augment", "data.augment_views"]
BATCH = 128   # encoder inputs per batch: 64 images and their flips, or 128 // V images x V views


@command("extract_latents")
def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv,
                      prepared={"default": "data/prepared", "help": "prepared dataset folder"},
                      tokenizer={"default": "models/tokenizer", "help": "tokenizer folder"},
                      out={"default": "data/latents", "help": "output folder"})
    params = load_params(args.params, uses=PARAM_KEYS)
    check_out_dir(args.out)
    check_in_dir(args.prepared, "--prepared", "dataset_dict.json", hint="run the prepare stage (dvc repro prepare)")
    device = setup_torch(params)
    with about("--tokenizer"):
        vqvae = load_tokenizer(args.tokenizer, device, expect_config=params.tokenizer)
    sha = file_sha256(tokenizer_path(args.tokenizer))
    encode = partial(encode_images, vqvae.eval(), precision="fp32")
    stats = {}
    with stage_run("extract_latents", params, PARAM_KEYS) as log, replace_dir(args.out, "extract_latents") as tmp:
        for split in ("train", "val"):
            t0 = time.perf_counter()
            official = params.data.augment == "official" and split == "train"
            if official and load_stats(args.prepared).get("augment") != "official":
                raise SplitError(f"{args.prepared} was prepared with data.augment: center (centre crops only); "
                                 f"rerun the prepare stage for data.augment: official")
            views = params.data.augment_views if official else None
            images = load_split(args.prepared, split, 0 if official else params.data.in_memory_mb)
            if official:
                loader = views_loader(images, views, params.data.resolution, params.seed,
                                      max(1, BATCH // views), params.data.num_workers)
            else:
                loader = images.loader(RangeBatchSampler(len(images), BATCH // 2), params.data.num_workers)
            extract_split(encode, loader, tmp / split, len(images), images.class_names, sha, device,
                          dtype=params.data.latent_dtype, views=views)
            h, w = images.image_hw
            shape = [len(images), views or 2, params.tokenizer.codebook_dim, h // vqvae.downsample,
                     w // vqvae.downsample]
            stats[split] = {"images": len(images), "shape": shape, "seconds": time.perf_counter() - t0,
                            "dtype": params.data.latent_dtype, "augment": "official" if official else "center"}
            log.log_metrics({f"{split}_images": len(images), f"{split}_seconds": stats[split]["seconds"]})
        write_json(tmp / "stats.json", stats | {"tokenizer_sha256": sha})
    print("extract_latents: wrote " + ", ".join(f"{s}: {v['shape']}" for s, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
