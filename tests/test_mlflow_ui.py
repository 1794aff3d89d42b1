"""The README's MLflow steps in a real headless Chromium on a finished smoke run.

A copy of the project runs `dvc repro` on the smoke preset; benchmarks/mlflow_ui_tour.py starts a real
`mlflow server` on localhost on its store and drives Debian's Chromium (Selenium, nothing downloaded)
through the README's steps. In the runs table, each evaluate run's row must show in its fid_domain cell the FID
that its variant's evaluate stage wrote (reports/fid_table.json), and the chart view
the FID-vs-steps chart with one line per depth. Without chromium/chromedriver the test fails with
one line saying so (CI installs them with apt, .ci/run).
"""
from __future__ import annotations

import json
import sys

import pytest

from tests.project_copy import copy_project, run


@pytest.mark.slow
def test_readme_mlflow_steps_show_every_fid(project_root, tmp_path):
    from benchmarks.mlflow_ui_tour import browser_missing, free_port, start_server, tour

    problem = browser_missing()
    assert problem is None, problem
    repo = copy_project(project_root, tmp_path / "repo")
    run([sys.executable, "-m", "flexvar.cli", "preset", "smoke"], repo)
    run([sys.executable, "-m", "dvc", "repro"], repo)
    port = free_port()
    server = start_server(repo, port, tmp_path / "mlflow_server.log")
    try:
        seen = tour(f"http://127.0.0.1:{port}", tmp_path / "shots")
    finally:
        server.terminate()
        server.wait(timeout=30)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flexvar")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    evaluate = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate'")
    table = json.loads((repo / "reports" / "fid_table.json").read_text())["rows"]
    assert len(evaluate) == len(table) > 0
    fid_of = {f"evaluate d{row['depth']}/{row['schedule']}": row["fid_domain"] for row in table}   # the stage outputs
    rows = seen["table_rows"]                                                  # run id -> column id -> cell text
    for r in evaluate:
        cells = rows.get(r.info.run_id)
        assert cells is not None, (r.info.run_name, "no row in the runs table")
        assert cells["attributes.`Run Name`"].splitlines()[-1] == r.info.run_name
        shown = cells.get("metrics.`fid_domain`")                             # this run's own FID cell
        assert shown not in (None, "", "-"), (r.info.run_name, cells)
        assert float(shown) == pytest.approx(fid_of[r.info.run_name], rel=1e-6), (r.info.run_name, shown)
    depths = {str(row["depth"]) for row in table}
    assert "fid_domain_vs_steps" in seen["chart_text"]
    assert all(f"FID vs steps d{d}" in seen["chart_text"] for d in depths)
    parent = client.search_runs([exp.experiment_id], "tags.flexvar_role = 'pipeline'")[0]
    assert {f"fid_domain_d{row['depth']}_{row['schedule']}" for row in table} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"fid_table.md", "fid_vs_steps.png"} <= artifacts
