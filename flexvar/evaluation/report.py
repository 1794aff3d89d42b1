"""The cross-variant report: one row per depth x schedule, a Markdown table and FID-vs-steps plot.

Rows come from the evaluate stage's metrics JSON files; each row also carries the schedule's
step count and output size, so the table reads across depths x schedules x sizes and the plot
shows FID against the number of steps with one line per depth (paper Fig. 7; schedules with a
non-default output size are drawn as their own line, labelled with the size). A companion plot
shows the samples' class accuracy the same way, with the classifier's accuracy on real val images
as the ceiling. Where the metrics carry 95% bootstrap intervals (`<metric>_ci_low/_ci_high`), the
table prints them after the value and the plots draw them as error bars.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

COLUMNS = ["fid", "class_acc", "kid", "isc", "precision", "recall"]   # table order, as <name>_<space>


def sort_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (depth, schedule, steps, size 'HxW', train_size, metrics...) by depth, then size, then steps."""
    return sorted(results, key=lambda r: (r["depth"], r["size"] != r.get("train_size"), r["size"], r["steps"]))


def markdown_table(rows: list[dict[str, Any]], feature_space: str) -> str:
    metrics = [f"{m}_{feature_space}" for m in COLUMNS if any(f"{m}_{feature_space}" in r for r in rows)]
    protocol = any("protocol" in r for r in rows)   # evaluate records how every FID was measured
    head = ["depth", "schedule", "steps", "size", *metrics, "samples", *(["protocol"] if protocol else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h not in ("schedule", "size", "protocol")
                                                         else "---" for h in head) + "|"]
    for r in rows:
        cells = [f"d{r['depth']}", r["schedule"], str(r["steps"]), r["size"],
                 *(_fmt_ci(r, m) for m in metrics), str(r.get("num_samples", "")),
                 *([str(r.get("protocol", ""))] if protocol else [])]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nMetrics in the `{feature_space}` feature space"
            + (" (the pipeline's own classifier; not comparable to Inception FID)." if feature_space == "domain"
               else " (torch-fidelity inception-v3-compat)."))
    if any(f"{m}_ci_low" in r for r in rows for m in metrics):
        note += " [low, high]: 95% bootstrap interval over the generated set."
    ceiling = next((r[f"class_acc_{feature_space}_real"] for r in rows if f"class_acc_{feature_space}_real" in r), None)
    if ceiling is not None:
        note += (f" class_acc: share of samples the classifier assigns to the class they were generated for; "
                 f"the same classifier on real val images: {ceiling:.4f} (the ceiling).")
    return "\n".join(lines) + "\n" + note + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _fmt_ci(row: dict[str, Any], key: str) -> str:
    """'value [low, high]' where the row has the key's bootstrap interval, else 'value'."""
    lo, hi = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    return _fmt(row.get(key)) + (f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else "")


def _depth(r: dict[str, Any]) -> str:
    return f"d{r['depth']}"


def _series(rows: list[dict[str, Any]], line_of=_depth) -> dict[str, list[dict[str, Any]]]:
    """Group rows into plot lines: 'd{depth}' (or `line_of(row)`), plus 'd{depth} {size}' for non-default sizes."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = line_of(r) if r["size"] == r.get("train_size") else f"{line_of(r)} {r['size']}"
        lines.setdefault(label, []).append(r)
    return {k: sorted(v, key=lambda r: r["steps"]) for k, v in lines.items()}


def write_plot_data(rows: list[dict[str, Any]], feature_space: str, path: str | os.PathLike) -> Path:
    """Long-format CSV for DVC plots: line (plot series), depth, schedule, steps, size, fid_<space>.

    FID is the last column, so it is DVC's default y; pipeline/fid_vs_steps.vega.json colours by `line`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"fid_{feature_space}"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["line", "depth", "schedule", "steps", "size", key])
        for label, series in _series(rows).items():
            for r in series:
                w.writerow([label, r["depth"], r["schedule"], r["steps"], r["size"], r.get(key)])
    return path


def plot_fid_vs_steps(rows: list[dict[str, Any]], feature_space: str, path: str | os.PathLike,
                      line_of=_depth, title: str = "FID vs steps per model depth") -> Path:
    """PNG: FID against the number of steps, one line per depth (or per `line_of(row)`, e.g. a setting),
    95% intervals as error bars."""
    return plot_vs_steps(rows, f"fid_{feature_space}", f"FID ({feature_space} features)", title, path,
                         line_of=line_of)


def plot_class_acc_vs_steps(rows: list[dict[str, Any]], feature_space: str, path: str | os.PathLike) -> Path:
    """PNG: class accuracy of samples against steps (the FID plot's companion), the real-image ceiling dotted.

    Written even when the rows carry no class accuracy (a space without a classifier mapping), with
    empty axes saying so, so the stage's declared output always exists.
    """
    key = f"class_acc_{feature_space}"
    ceiling = next((r[f"{key}_real"] for r in rows if f"{key}_real" in r), None)
    title = ("Samples assigned to their class, per depth" if any(key in r for r in rows)
             else f"no class accuracy in the {feature_space} space")
    return plot_vs_steps(rows, key, f"class accuracy ({feature_space} classifier)", title, path, ceiling=ceiling)


def plot_vs_steps(rows: list[dict[str, Any]], key: str, ylabel: str, title: str, path: str | os.PathLike,
                  ceiling: float | None = None, line_of=_depth) -> Path:
    """PNG: `key` against the number of steps, one line per depth (other sizes dashed), CIs as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    colours = {d: f"C{i}" for i, d in enumerate(dict.fromkeys(line_of(r) for r in rows))}
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, series in _series(rows, line_of).items():
        pts = [r for r in series if r.get(key) is not None]
        if pts:
            xs, ys = [r["steps"] for r in pts], [r[key] for r in pts]
            err = None
            if all(f"{key}_ci_low" in r and f"{key}_ci_high" in r for r in pts):
                err = [[max(r[key] - r[f"{key}_ci_low"], 0) for r in pts],
                       [max(r[f"{key}_ci_high"] - r[key], 0) for r in pts]]
            other_size = " " in label          # 'd2 96x96': same colour as d2, dashed, square markers
            ax.errorbar(xs, ys, yerr=err, color=colours[line_of(series[0])], marker="s" if other_size else "o",
                        linestyle="--" if other_size else "-", capsize=3, label=label)
    if ceiling is not None:
        ax.axhline(ceiling, color="grey", linestyle=":", label=f"real val images ({ceiling:.2f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of generation steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
