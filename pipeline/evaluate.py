"""DVC stage `evaluate` (matrix over depths x schedules): sample quality of one variant.

    python -m pipeline.evaluate --params params.yaml --depth 2 --schedule short

Reads samples/d{depth}/{schedule}/samples.npz, scores it against the cached reference
(reference_stats) in `evaluate.feature_space`, writes metrics/eval/d{depth}/{schedule}.json
(DVC metrics; keys name the feature space: fid_domain, isc_domain, kid_domain, ...), plus the class
accuracy of the samples (class_acc_domain; class_acc_inception needs evaluate.inception_label_map and
ImageNet's 1000 classes, else one printed line says it is skipped and why), 95% bootstrap intervals
(fid_domain_ci_low/_ci_high, class_acc_domain_ci_low/_ci_high), the classifier's accuracy on real val images (class_acc_domain_real,
the ceiling for class_acc_domain) and, with every FID, its protocol (reference, number of samples, cfg,
top-k, top-p, steps, greedy rule): in the JSON as `protocol`, in MLflow as `protocol.*` params and the
`protocol` tag.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.common import phase, setup_torch, stage_args, write_json

from flexvar.config import SamplingSettings, load_params
from flexvar.errors import about, command
from flexvar.evaluation.feature_net import feature_net_metrics
from flexvar.evaluation.intervals import class_acc_skipped, sample_intervals
from flexvar.evaluation.metrics import compute_metrics, fid_protocol, load_samples
from flexvar.outputs import check_in_dir, check_in_file, check_out_file
from flexvar.schedules import schedule_steps
from pipeline.tracking import stage_run, tag_model_version

PARAM_KEYS = ["seed", "evaluate.feature_space", "evaluate.inception_weights", "evaluate.inception_label_map",
              "evaluate.metrics", "evaluate.reference_split", "evaluate.reference", "evaluate.kid_subset_size",
              "evaluate.bootstrap_samples",
              *(f"sample.{k}" for k in SamplingSettings.model_fields)]


def sampling_settings(params, schedule: str, samples_dir: Path) -> dict:
    """How the samples were drawn: the sample stage's info.json (written next to samples.npz: the
    SamplingSettings it generated with, steps and scales) where there is one, else params.yaml's
    sample section (DVC keeps the two in step)."""
    out = {"sampling": params.sample.sampling, "steps": schedule_steps(params, schedule), "scales": None}
    info_path = samples_dir / "info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        out |= {k: info[k] for k in ("steps", "scales") if k in info}
        if "sampling" in info:
            out["sampling"] = SamplingSettings.model_validate(info["sampling"])
    return out


def model_sha256(samples_dir: Path) -> str:
    """sha256 of the transformer checkpoint the samples were drawn with (the sample stage's info.json)."""
    info = samples_dir / "info.json"
    return json.loads(info.read_text()).get("model_sha256", "") if info.is_file() else ""


@command("evaluate")
def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, depth={"type": int, "required": True}, schedule={"required": True},
                      samples={"default": None}, reference={"default": "data/reference"},
                      feature_net={"default": "models/feature_net/model.pt"}, out={"default": None})
    params = load_params(args.params, uses=PARAM_KEYS)
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
    skipped = class_acc_skipped(cfg, labels_N)     # before any feature extraction: a bad label map stops here
    if skipped:
        print(f"evaluate {variant}: {skipped}")
    device = setup_torch(params)
    keys = PARAM_KEYS + [f"sample.schedules.{args.schedule}"]
    with stage_run("evaluate", params, keys, variant=variant, tags={"feature_space": cfg.feature_space}) as tracker:
        reference = Path(args.reference) / cfg.feature_space
        with phase(f"evaluate {variant}: {', '.join(cfg.metrics)} of {len(images_NCHW)} samples"):
            metrics = compute_metrics(images_NCHW, reference, cfg, args.feature_net, device, params.seed)
        with phase(f"evaluate {variant}: class accuracy and {cfg.bootstrap_samples} bootstrap resamples"):
            metrics.update(sample_intervals(images_NCHW, labels_N, metrics, reference, cfg, args.feature_net,
                                            device, params.seed))
        if cfg.feature_space == "domain":   # the ceiling: the same classifier on real val images
            metrics["class_acc_domain_real"] = feature_net_metrics(args.feature_net)["val_accuracy"]
        metrics["num_samples"] = len(images_NCHW)
        metrics["steps"] = schedule_steps(params, args.schedule)   # numbers too, for MLflow's compare plots
        metrics["depth"] = args.depth
        protocol = fid_protocol(cfg, num_samples=len(images_NCHW),
                                **sampling_settings(params, args.schedule, samples_path.parent))
        tracker.log_metrics(metrics)
        # params too: the UI's chart view and parallel coordinates compare evaluate runs by depth/steps
        tracker.log_params({"depth": args.depth, "steps": metrics["steps"], "schedule": args.schedule})
        tracker.log_params({f"protocol.{k}": v for k, v in protocol.items()})
        fid_key = f"fid_{cfg.feature_space}"
        if fid_key in metrics:   # the registry: the flexvar-d{depth} version these samples came from
            tag_model_version(tracker, args.depth, model_sha256(samples_path.parent),
                              {f"{fid_key}/{args.schedule}": metrics[fid_key],
                               f"evaluate_run/{args.schedule}": tracker.run_id})
        tracker.set_tags({"protocol": protocol["summary"]})
        metrics["protocol"] = protocol["summary"]
        write_json(out, metrics)
        tracker.log_artifact(out)
    print(f"evaluate {variant}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "protocol")
          + f" [{metrics['protocol']}] -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
