"""DVC stage `train_feature_net`: the classifier whose features are the offline 'domain' space.

    python -m pipeline.train_feature_net --params params.yaml --prepared data/prepared \
        --out models/feature_net/model.pt --metrics metrics/feature_net.json --plot plots/feature_net.csv

Reports val accuracy (a feature space is only as meaningful as the classifier is accurate).
"""
from __future__ import annotations

import sys

from pipeline.common import setup_torch, stage_args, write_json

from flexvar.config import load_params
from flexvar.data.splits import load_split
from flexvar.errors import command
from flexvar.evaluation.feature_net import save_feature_net, train_feature_net
from flexvar.outputs import check_in_dir, check_out_file
from flexvar.run_logger import CsvLogger, MultiLogger
from pipeline.tracking import stage_run

PARAM_KEYS = ["seed", "evaluate.feature_net_steps", "evaluate.feature_net_batch_size", "evaluate.feature_net_lr"]


@command("train_feature_net")
def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, prepared={"default": "data/prepared"},
                      out={"default": "models/feature_net/model.pt"},
                      metrics={"default": "metrics/feature_net.json"}, plot={"default": "plots/feature_net.csv"})
    params = load_params(args.params, uses=PARAM_KEYS)
    for arg, path, suffix in (("--out", args.out, ".pt"), ("--metrics", args.metrics, ".json"),
                              ("--plot", args.plot, ".csv")):
        check_out_file(path, arg, {suffix})
    check_in_dir(args.prepared, "--prepared", "dataset_dict.json", hint="run the prepare stage (dvc repro prepare)")
    device = setup_torch(params)
    cfg = params.evaluate
    with stage_run("train_feature_net", params, PARAM_KEYS, system_metrics=True) as tracker:
        train = load_split(args.prepared, "train", params.data.in_memory_mb)
        val = load_split(args.prepared, "val", params.data.in_memory_mb)
        logger = MultiLogger([tracker, CsvLogger(args.plot)])
        model, metrics = train_feature_net(train, val, cfg.feature_net_steps, cfg.feature_net_batch_size,
                                           cfg.feature_net_lr, device, params.seed, logger=logger,
                                           num_workers=params.data.num_workers)
        save_feature_net(model, args.out, metrics)
        write_json(args.metrics, metrics)
        tracker.log_artifact(args.metrics)
        tracker.log_artifact(args.plot)
    print(f"train_feature_net: val accuracy {metrics['val_accuracy']:.3f} ({len(val)} images, "
          f"{val.num_classes} classes) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
