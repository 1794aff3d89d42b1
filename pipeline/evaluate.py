"""DVC stage `evaluate` (matrix over depths x schedules): sample quality of one variant.

    python -m pipeline.evaluate --params params.yaml --depth 2 --schedule short

Reads samples/d{depth}/{schedule}/samples.npz, scores it against the cached reference
(reference_stats) in `evaluate.feature_space`, writes metrics/eval/d{depth}/{schedule}.json
(DVC metrics; keys name the feature space: fid_domain, isc_domain, kid_domain, ...), plus the class
accuracy of the samples (class_acc_domain), 95% bootstrap intervals (fid_domain_ci_low/_ci_high,
class_acc_domain_ci_low/_ci_high) and the classifier's accuracy on real val images (class_acc_domain_real,
the ceiling for class_acc_domain).
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.common import setup_torch, stage_args, write_json

from flexvar.config import load_params
from flexvar.errors import about, command
from flexvar.evaluation.feature_net import feature_net_metrics
from flexvar.evaluation.intervals import sample_intervals
from flexvar.evaluation.metrics import compute_metrics, load_samples
from flexvar.outputs import check_in_dir, check_in_file, check_out_file
from flexvar.transformer.schedules import schedule_steps
from pipeline.tracking import stage_run

PARAM_KEYS = ["seed", "evaluate.feature_space", "evaluate.inception_weights", "evaluate.metrics",
              "evaluate.reference_split", "evaluate.kid_subset_size", "evaluate.bootstrap_samples"]


@command("evaluate")
def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, depth={"type": int, "required": True}, schedule={"required": True},
                      samples={"default": None}, reference={"default": "data/reference"},
                      feature_net={"default": "models/feature_net/model.pt"}, out={"default": None})
    params = load_params(args.params)
    variant = f"d{args.depth}/{args.schedule}"
    samples_path = Path(args.samples or f"samples/{variant}/samples.npz")
    out = check_out_file(args.out or f"metrics/eval/{variant}.json", "--out", {".json"})
    cfg = params.evaluate
    check_in_file(samples_path, "--samples")
    check_in_dir(Path(args.reference) / cfg.feature_space, "--reference", hint="run the reference_stats stage")
    if cfg.feature_space == "domain":
        check_in_file(args.feature_net, "--feature-net")
    with about("--samples"):
        images_NCHW, labels_N = load_samples(samples_path)
    device = setup_torch(params)
    keys = PARAM_KEYS + [f"sample.schedules.{args.schedule}"]
    with stage_run("evaluate", params, keys, variant=variant, tags={"feature_space": cfg.feature_space}) as tracker:
        reference = Path(args.reference) / cfg.feature_space
        metrics = compute_metrics(images_NCHW, reference, cfg, args.feature_net, device, params.seed)
        metrics.update(sample_intervals(images_NCHW, labels_N, metrics, reference, cfg, args.feature_net,
                                        device, params.seed))
        if cfg.feature_space == "domain":   # the ceiling: the same classifier on real val images
            metrics["class_acc_domain_real"] = feature_net_metrics(args.feature_net)["val_accuracy"]
        metrics["num_samples"] = len(images_NCHW)
        metrics["steps"] = schedule_steps(params, args.schedule)   # numbers too, for MLflow's compare plots
        metrics["depth"] = args.depth
        write_json(out, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(out)
    print(f"evaluate {variant}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()) + f" -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
