"""DVC stage `reference_stats`: features and FID statistics of the reference split, computed once.

    python -m pipeline.reference_stats --params params.yaml --prepared data/prepared \
        --feature-net models/feature_net/model.pt --out data/reference

Writes torch-fidelity's cache for `evaluate.reference_split` in `evaluate.feature_space` to
<out>/<feature_space>/, which every `evaluate` variant then only reads.
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.common import phase, setup_torch, stage_args

from flexvar.config import load_params
from flexvar.data.splits import ImagesOnly, load_split
from flexvar.errors import command
from flexvar.evaluation.metrics import compute_reference
from flexvar.outputs import check_in_dir, check_in_file, check_out_dir, replace_dir
from pipeline.tracking import stage_run

PARAM_KEYS = ["seed", "evaluate.feature_space", "evaluate.inception_weights", "evaluate.metrics",
              "evaluate.reference_split", "evaluate.reference", "evaluate.kid_subset_size"]


@command("reference_stats")
def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, prepared={"default": "data/prepared"},
                      feature_net={"default": "models/feature_net/model.pt"}, out={"default": "data/reference"})
    params = load_params(args.params, uses=PARAM_KEYS)
    check_out_dir(args.out)
    cfg = params.evaluate
    if not cfg.reference:   # evaluate.reference names another source: the prepared split is not read
        check_in_dir(args.prepared, "--prepared", "dataset_dict.json", hint="run the prepare stage (dvc repro prepare)")
    if cfg.feature_space == "domain":
        check_in_file(args.feature_net, "--feature-net")
    device = setup_torch(params)
    out_dir = Path(args.out) / cfg.feature_space
    with stage_run("reference_stats", params, PARAM_KEYS, tags={"feature_space": cfg.feature_space}) as tracker:
        with replace_dir(args.out, "reference_stats") as tmp:
            images, workers = None, False          # evaluate.reference names the source: nothing to load
            if not cfg.reference:
                reference = load_split(args.prepared, cfg.reference_split, params.data.in_memory_mb)
                images = reference.images_NCHW if reference.in_memory else ImagesOnly(reference)   # large: from disk
                workers = not reference.in_memory and params.data.num_workers > 0
            what = f"{len(images)} {cfg.reference_split} images" if images is not None else cfg.reference
            with phase(f"reference_stats: {cfg.feature_space} features and statistics of {what}"):
                info = compute_reference(images, tmp / cfg.feature_space, cfg, args.feature_net, device,
                                         params.seed, workers=workers)
        tracker.log_metrics({f"reference_{k}": v for k, v in info["self_metrics"].items()})
        tracker.log_metrics({"reference_images": info["num_images"] or 0})
        tracker.log_artifact(out_dir / "reference.json")
    print(f"reference_stats: {info['source']} ({info['num_images'] or 'statistics only'}) images in the {cfg.feature_space} space -> "
          f"{out_dir}; reference vs itself: " + ", ".join(f"{k}={v:.4g}" for k, v in info["self_metrics"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
