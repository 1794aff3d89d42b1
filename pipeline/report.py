"""DVC stage `report`: the table across depths x schedules x sizes and the FID-vs-steps plot.

    python -m pipeline.report --params params.yaml --metrics-dir metrics/eval --out reports

Writes reports/fid_table.md, reports/fid_table.json, reports/fid_vs_steps.png,
reports/class_acc_vs_steps.png (its companion: class accuracy of samples, real-image ceiling) and
reports/fid_vs_steps.csv (DVC plot with pipeline/fid_vs_steps.vega.json: x = steps, one line per depth).
Both PNGs draw the 95% bootstrap intervals as error bars.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.common import set_offline_env, stage_args, write_json

set_offline_env()

from flexvar.config import load_params  # noqa: E402
from flexvar.evaluation.report import (  # noqa: E402
    markdown_table, plot_class_acc_vs_steps, plot_fid_vs_steps, sort_rows, write_plot_data,
)
from flexvar.transformer.schedules import schedule_size, schedule_steps  # noqa: E402
from pipeline.tracking import stage_run  # noqa: E402

PARAM_KEYS = ["variants", "sample.schedules", "data.resolution", "evaluate.feature_space"]


def reported_keys(space: str) -> list[str]:
    """Per-variant keys the report run logs to MLflow: FID and class accuracy with their intervals."""
    return [f"{m}_{space}{ci}" for m in ("fid", "class_acc") for ci in ("", "_ci_low", "_ci_high")]


def collect(params, metrics_dir: Path) -> list[dict]:
    """One row per variant in params (variants.depths x variants.schedules) from its metrics JSON."""
    res = params.data.resolution
    rows = []
    for depth in params.variants.depths:
        for sched in params.variants.schedules:
            path = metrics_dir / f"d{depth}" / f"{sched}.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; run the evaluate stage for d{depth}/{sched}")
            h, w = schedule_size(params, sched)
            rows.append({"depth": depth, "schedule": sched, "steps": schedule_steps(params, sched),
                         "size": f"{h}x{w}", "train_size": f"{res}x{res}", **json.loads(path.read_text())})
    return sort_rows(rows)


def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, metrics_dir={"default": "metrics/eval"}, out={"default": "reports"})
    params = load_params(args.params)
    space = params.evaluate.feature_space
    out = Path(args.out)
    with stage_run("report", params, PARAM_KEYS, tags={"feature_space": space}) as tracker:
        rows = collect(params, Path(args.metrics_dir))
        table = markdown_table(rows, space)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fid_table.md").write_text(f"# FID across depths x schedules x sizes\n\n{table}")
        write_json(out / "fid_table.json", {"feature_space": space, "rows": rows})
        write_plot_data(rows, space, out / "fid_vs_steps.csv")
        plot_fid_vs_steps(rows, space, out / "fid_vs_steps.png")
        plot_class_acc_vs_steps(rows, space, out / "class_acc_vs_steps.png")
        for r in rows:
            tracker.log_metrics({f"{key}_d{r['depth']}_{r['schedule']}": r[key]
                                 for key in reported_keys(space) if key in r})
        for name in ("fid_table.md", "fid_table.json", "fid_vs_steps.png", "class_acc_vs_steps.png",
                     "fid_vs_steps.csv"):
            tracker.log_artifact(out / name)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
