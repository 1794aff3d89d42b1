"""DVC stage `report`: the table across depths x schedules x sizes and the FID-vs-steps plot.

    python -m pipeline.report --params params.yaml --metrics-dir metrics/eval --out reports

Writes reports/fid_table.md, reports/fid_table.json, reports/fid_vs_steps.png,
reports/class_acc_vs_steps.png (its companion: class accuracy of samples, real-image ceiling) and
reports/fid_vs_steps.csv (DVC plot with pipeline/fid_vs_steps.vega.json: x = steps, one line per depth).
Both PNGs draw the 95% bootstrap intervals as error bars.
MLflow: the report run and the pipeline's parent run both get the files and the per-variant metrics
(`fid_<space>_d{depth}_{schedule}`, ...). FID across depths and steps is compared in the UI on the
evaluate runs themselves (params depth, steps, schedule; metric fid_<space>): chart view or parallel
coordinates, no extra runs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.common import stage_args, write_json

from flexvar.config import load_params
from flexvar.errors import FlexvarError, command
from flexvar.evaluation.report import (
    markdown_table, plot_class_acc_vs_steps, plot_fid_vs_steps, sort_rows, write_plot_data,
)
from flexvar.outputs import check_in_dir, check_out_dir
from flexvar.schedules import schedule_size, schedule_steps
from pipeline.tracking import parent_logger, stage_run

PARAM_KEYS = ["variants", "sample.schedules", "data.resolution", "evaluate.feature_space"]


def reported_keys(space: str) -> list[str]:
    """Per-variant keys the report run logs to MLflow: FID and class accuracy with their intervals."""
    return [f"{m}_{space}{ci}" for m in ("fid", "class_acc") for ci in ("", "_ci_low", "_ci_high")]


def read_metrics(path: Path, params) -> dict:
    """One evaluate output; FlexvarError naming the file if it is not JSON or lacks this feature space's FID."""
    key = f"fid_{params.evaluate.feature_space}"
    try:
        metrics = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FlexvarError(f"--metrics-dir: {path} is not valid JSON ({e}); rerun the evaluate stage") from None
    if not isinstance(metrics, dict) or key not in metrics:
        raise FlexvarError(f"--metrics-dir: {path} has no {key!r}; rerun evaluate with evaluate.feature_space "
                           f"= {params.evaluate.feature_space}")
    return metrics


def collect(params, metrics_dir: Path) -> list[dict]:
    """One row per variant in params (variants.depths x variants.schedules) from its metrics JSON."""
    res = params.data.resolution
    rows = []
    for depth in params.variants.depths:
        for sched in params.variants.schedules:
            path = metrics_dir / f"d{depth}" / f"{sched}.json"
            if not path.is_file():
                raise FlexvarError(f"--metrics-dir: {path} is missing; run the evaluate stage for d{depth}/{sched}")
            h, w = schedule_size(params, sched)
            rows.append({"depth": depth, "schedule": sched, "steps": schedule_steps(params, sched),
                         "size": f"{h}x{w}", "train_size": f"{res}x{res}", **read_metrics(path, params)})
    return sort_rows(rows)


@command("report")
def main(argv: list[str] | None = None) -> int:
    args = stage_args(__doc__, argv, metrics_dir={"default": "metrics/eval"}, out={"default": "reports"})
    params = load_params(args.params, uses=PARAM_KEYS)
    space = params.evaluate.feature_space
    out = check_out_dir(args.out, replaces=False)   # writes four named files, deletes nothing
    check_in_dir(args.metrics_dir, "--metrics-dir", hint="run the evaluate stages")
    rows = collect(params, Path(args.metrics_dir))   # every input read and checked before anything is written
    with stage_run("report", params, PARAM_KEYS, tags={"feature_space": space}) as tracker:
        table = markdown_table(rows, space)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fid_table.md").write_text(f"# FID across depths x schedules x sizes\n\n{table}")
        write_json(out / "fid_table.json", {"feature_space": space, "rows": rows})
        write_plot_data(rows, space, out / "fid_vs_steps.csv")
        plot_fid_vs_steps(rows, space, out / "fid_vs_steps.png")
        plot_class_acc_vs_steps(rows, space, out / "class_acc_vs_steps.png")
        per_variant = {f"{key}_d{r['depth']}_{r['schedule']}": r[key]
                       for r in rows for key in reported_keys(space) if key in r}
        for log in (tracker, parent_logger(tracker)):     # the parent run carries the report too
            log.log_metrics(per_variant)
            for name in ("fid_table.md", "fid_table.json", "fid_vs_steps.png", "class_acc_vs_steps.png",
                         "fid_vs_steps.csv"):
                log.log_artifact(out / name)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
