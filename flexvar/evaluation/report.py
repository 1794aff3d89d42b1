"""The cross-variant report: one row per depth x schedule, a Markdown table and FID-vs-steps plot.

Rows come from the evaluate stage's metrics JSON files; each row also carries the schedule's
step count and output size, so the table reads across depths x schedules x sizes and the plot
shows FID against the number of steps with one line per depth (paper Fig. 7; schedules with a
non-default output size are drawn as their own line, labelled with the size).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

COLUMNS = ["fid", "kid", "isc", "precision", "recall"]   # shown in the table, in this order, as <name>_<space>


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
                 *(_fmt(r.get(m)) for m in metrics), str(r.get("num_samples", "")),
                 *([str(r.get("protocol", ""))] if protocol else [])]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nMetrics in the `{feature_space}` feature space"
            + (" (the pipeline's own classifier; not comparable to Inception FID)." if feature_space == "domain"
               else " (torch-fidelity inception-v3-compat)."))
    return "\n".join(lines) + "\n" + note + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Group rows into plot lines: 'd{depth}', plus 'd{depth} {size}' for non-default sizes."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = f"d{r['depth']}" if r["size"] == r.get("train_size") else f"d{r['depth']} {r['size']}"
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


def plot_fid_vs_steps(rows: list[dict[str, Any]], feature_space: str, path: str | os.PathLike) -> Path:
    """PNG: FID against the number of steps, one line per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    key = f"fid_{feature_space}"
    depths = sorted({r["depth"] for r in rows})
    colours = {d: f"C{i}" for i, d in enumerate(depths)}
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, series in _series(rows).items():
        pts = [(r["steps"], r[key]) for r in series if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            other_size = " " in label          # 'd2 96x96': same colour as d2, dashed, square markers
            ax.plot(xs, ys, color=colours[series[0]["depth"]], marker="s" if other_size else "o",
                    linestyle="--" if other_size else "-", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of generation steps")
    ax.set_ylabel(f"FID ({feature_space} features)")
    ax.set_title("FID vs steps per model depth")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
