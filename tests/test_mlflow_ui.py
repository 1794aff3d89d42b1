"""The README's MLflow steps in a real headless Chromium on a finished smoke run.

A copy of the project runs `dvc repro` on the smoke preset; benchmarks/mlflow_ui_tour.py starts a real
`mlflow server` on localhost on its store and drives Debian's Chromium (Selenium, nothing downloaded)
through the README's steps. In the runs table, each evaluate run's row must show in its fid_domain cell the FID
that its variant's evaluate stage wrote (reports/fid_table.json), and the chart view the evaluate runs' FID
(params depth and steps on each run). The run page of the run that registered the model shows MLflow's
standard tags (Created by: mlflow.user; Source: mlflow.source.name and mlflow.source.git.commit), and the
registry page lists every version of the model with the FID tags evaluate set on it (the stage outputs).
Without chromium/chromedriver the test fails with one line saying so (CI installs them with apt, .ci/run).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

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
        assert {"depth", "steps", "schedule"} <= set(r.data.params)            # comparable across depths and steps
    assert "fid_domain" in seen["chart_text"]
    assert all(r.info.run_name in seen["chart_text"] for r in evaluate)       # the evaluate runs themselves
    parent = client.search_runs([exp.experiment_id], "tags.flexvar_role = 'pipeline'")[0]
    assert {f"fid_domain_d{row['depth']}_{row['schedule']}" for row in table} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"fid_table.md", "fid_vs_steps.png"} <= artifacts

    # the run page: MLflow's standard tags of the run that registered the newest version of the model
    page = seen["run_page"]["text"].splitlines()
    tags = client.get_run(seen["run_page"]["run_id"]).data.tags
    assert tags["mlflow.source.type"] == "LOCAL"
    user = tags["mlflow.user"]
    assert page[page.index("Created by") + 1] == user, page
    source = page[page.index("Source") + 1: page.index("Source") + 4]            # name, branch, short commit
    assert source[0] == Path(tags["mlflow.source.name"]).name, source
    assert tags["mlflow.source.git.commit"][:7] in source, (source, tags["mlflow.source.git.commit"])
    # the registry page: every version of the model, the newest tagged with each schedule's FID
    model = seen["registry"]["model"]
    versions = client.search_model_versions(f"name = '{model}'")
    shown = seen["registry"]["text"]
    assert versions and all(f"Version {v.version}" in shown for v in versions), (model, shown)
    newest = max(versions, key=lambda v: int(v.version))
    assert newest.run_id == seen["run_page"]["run_id"]
    depth = int(model.removeprefix("flexvar-d"))
    fids = {k: v for k, v in newest.tags.items() if k.startswith("fid_domain/")}
    assert fids.keys() == {f"fid_domain/{row['schedule']}" for row in table if row["depth"] == depth}
    for key, value in fids.items():
        assert f"{key}\n: {value}" in shown, (key, value)
        assert float(value) == pytest.approx(fid_of[f"evaluate d{depth}/{key.split('/')[1]}"], rel=1e-6)
