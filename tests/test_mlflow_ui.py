"""The README's MLflow steps in a real headless Chromium on a finished smoke run.

A copy of the project runs `dvc repro` on the smoke preset; benchmarks/mlflow_ui_tour.py starts a real
`mlflow server` on localhost on its store and drives Debian's Chromium (Selenium, nothing downloaded)
through the README's steps. The runs table must show every evaluate run's FID, and the chart view
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
    for r in evaluate:
        fid = r.data.metrics["fid_domain"]
        assert r.info.run_name in seen["table_text"]
        assert repr(fid)[:6] in seen["table_text"], (r.info.run_name, fid)    # the cell shows the value
    depths = {str(row["depth"]) for row in table}
    assert "fid_domain_vs_steps" in seen["chart_text"]
    assert all(f"FID vs steps d{d}" in seen["chart_text"] for d in depths)
    parent = client.search_runs([exp.experiment_id], "tags.flexvar_role = 'pipeline'")[0]
    assert {f"fid_domain_d{row['depth']}_{row['schedule']}" for row in table} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"fid_table.md", "fid_vs_steps.png"} <= artifacts
