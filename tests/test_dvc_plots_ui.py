"""`dvc plots show` in a real headless Chromium: every plot declared in dvc.yaml is drawn, with a title and named axes.

On a copy of the project (its committed plots/, reports/ and dvc.lock), benchmarks/dvc_plots_shots.py runs
`dvc plots show` and saves each plot's element once Vega has drawn its canvas (the page's Vega scripts come
from npm, kept in .cache/vega). Without chromium/chromedriver the test fails with one line saying so.
"""
from __future__ import annotations

import struct

import pytest

from tests.project_copy import copy_project


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_every_declared_plot_is_drawn_with_named_axes(project_root, tmp_path):
    from benchmarks.dvc_plots_shots import run, shot_name
    from benchmarks.mlflow_ui_tour import browser_missing

    problem = browser_missing()
    assert problem is None, problem
    repo = copy_project(project_root, tmp_path / "repo")
    summary = run(repo, tmp_path / "shots", project_root / ".cache" / "vega")
    declared = {p for p in summary}
    assert {"plots/tokenizer/loss.csv", "plots/tokenizer/recon_scales.png", "reports/fid_vs_steps.csv"} <= declared
    for plot, seen in summary.items():
        png = tmp_path / "shots" / shot_name(plot)
        assert seen["png"] == str(png)
        width, height = png_size(png)
        assert width > 150 and height > 150, (plot, width, height)
        if seen["type"] == "vega":
            assert seen["title"] and seen["x_title"] and seen["y_title"] and seen["points"] > 0, (plot, seen)
    fid = summary["reports/fid_vs_steps.csv"]
    assert (fid["x"], fid["y"]) == ("steps", "fid_domain")
