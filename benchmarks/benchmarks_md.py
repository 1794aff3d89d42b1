"""Markdown tables for docs/benchmarks.md from the JSON of one run of the side-by-side benchmarks.

    python -m benchmarks.benchmarks_md DIR   # DIR holds transformer.json sample.json tokenizer.json and
                                             # optionally the same names with a suffix (_default_malloc,
                                             # _retained_malloc, _threads2: the other settings) and
                                             # profile.json, as the scripts printed them
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.profile_steps import markdown as profile_markdown


def side_by_side(title: str, kinds: dict[str, dict], key: str) -> str:
    """One row per measured kind: medians (wall spread) of every variant, and each of our variants'
    speed-up over each official one."""
    variants = list(next(iter(kinds.values()))["results"])
    mine = [v for v in variants if v.startswith("ours")]
    pairs = [(o, v) for o in mine for v in variants if v not in mine]
    pairs = pairs or [(o, v) for o in mine[:1] for v in mine[1:]]
    head = f"| {title} | " + " | ".join(variants) + " | " + " | ".join(f"{o} vs {v}" for o, v in pairs) + " |"
    lines = [head, "|---|" + "---:|" * (len(variants) + len(pairs))]
    for kind, block in kinds.items():
        res = block["results"]
        cells = [f"{r[key]:.2f} s (wall {r['min_s']:.2f}..{r['max_s']:.2f})" for r in res.values()]
        speed = [f"**{res[v][key] / res[o][key]:.2f}x**" for o, v in pairs]
        lines.append(f"| {kind} | " + " | ".join(cells + speed) + " |")
    return "\n".join(lines)


def machine_line(d: dict) -> str:
    m = d["machine"]
    return (f"{m.get('cpu', 'CPU not recorded')}; threads {m['threads']}, load average (1 min) "
            f"{m['load_avg_1m']} at start and {m.get('load_avg_1m_end', '?')} at end; 1024³ matmul {m['matmul_gflops_fp32']} GFLOP/s fp32, "
            f"{m['matmul_gflops_bf16']} GFLOP/s bf16 at start; malloc: {m.get('malloc', 'glibc default')}; "
            f"{d.get('official', '')}")


def finished_json(path: Path) -> dict | None:
    """A benchmark's JSON, or None while it is missing or empty (a run that has not finished)."""
    if not path.exists() or not path.stat().st_size:
        return None
    return json.loads(path.read_text())


BENCHMARKS = (("transformer", "transformer (batch 8)", ("train_step", "full_step")),
              ("sample", "sampling (batch 16)", ("end_to_end", "no_decode")),
              ("tokenizer", "tokenizer (VQ-16)", ("train", "infer")))
SETTINGS = ("", "_default_malloc", "_retained_malloc", "_threads2")   # file-name suffixes, in table order


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="the JSON of one run (docs/bench_cpu holds the documented one)")
    folder = ap.parse_args(argv).folder
    out = []
    runs = [(bench + suffix, title, kinds) for bench, title, kinds in BENCHMARKS for suffix in SETTINGS]
    for name, title, kinds in runs:
        d = finished_json(folder / f"{name}.json")
        if d is None:
            continue
        threads = d["machine"]["threads"]
        title += f", {threads} thread{'s' * (threads != 1)}"
        title += ", freed memory retained" if "retained" in d["machine"].get("malloc", "") else ", glibc malloc defaults"
        out += [f"### {name}", "", machine_line(d), "", side_by_side(title, {k: d[k] for k in kinds if k in d},
                                                          "cpu_median_s" if threads == 1 else "median_s"), ""]
        if "loss_curves" in d:
            c = d["loss_curves"]
            diffs = "; ".join(f"{k.removeprefix('max_abs_diff ')} {v:.4f}" for k, v in c.items() if k.startswith("max_abs_diff"))
            out += [f"Loss curves (depth 2, {c['steps']} steps, same seed and data), largest |difference|: {diffs}.", ""]
    if (d := finished_json(folder / "profile.json")) is not None:
        out += ["### profile", "", profile_markdown(d["profiles"]), ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
