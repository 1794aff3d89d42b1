"""DVC stage `extract_latents`: frozen tokenizer encoder over every image and its flip -> data/latents.

    python -m pipeline.extract_latents --params params.yaml --prepared data/prepared \
        --tokenizer models/tokenizer --out data/latents
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.common import set_offline_env, stage_args, setup_torch, write_json

set_offline_env()

from flexvar.checkpoint import CheckpointError  # noqa: E402
from flexvar.config import ConfigError, load_params  # noqa: E402
from flexvar.data.splits import load_split  # noqa: E402
from flexvar.checkpoint import file_sha256
from flexvar.data.latent_cache import encode_split, save_latents  # noqa: E402
from flexvar.tokenizer.vqvae import load_tokenizer, tokenizer_path  # noqa: E402
from pipeline.tracking import TrackingError, stage_run  # noqa: E402

PARAM_KEYS = ["seed", "tokenizer"]
BATCH = 64


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv,
                      prepared={"default": "data/prepared", "help": "prepared dataset folder"},
                      tokenizer={"default": "models/tokenizer", "help": "tokenizer folder"},
                      out={"default": "data/latents", "help": "output folder"})
    try:
        params = load_params(args.params)
        device = setup_torch(params)
        vqvae = load_tokenizer(args.tokenizer, device, expect_config=params.tokenizer)
        sha = file_sha256(tokenizer_path(args.tokenizer))
        stats = {}
        with stage_run("extract_latents", params, PARAM_KEYS) as log:
            for split in ("train", "val"):
                t0 = time.perf_counter()
                images = load_split(args.prepared, split)
                z = encode_split(vqvae, images, BATCH, device, precision="fp32")
                save_latents(Path(args.out) / f"{split}.pt", z, images, sha)
                stats[split] = {"images": len(images), "shape": list(z.shape), "seconds": time.perf_counter() - t0}
                log.log_metrics({f"{split}_images": len(images), f"{split}_seconds": stats[split]["seconds"]})
            write_json(Path(args.out) / "stats.json", stats | {"tokenizer_sha256": sha})
    except (ConfigError, CheckpointError, TrackingError, FileNotFoundError) as e:
        print(f"extract_latents: error: {e}", file=sys.stderr)
        return 2
    print("extract_latents: wrote " + ", ".join(f"{s}: {v['shape']}" for s, v in stats.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
