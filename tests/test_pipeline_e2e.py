"""The whole chain under a real `dvc repro` on the smoke preset, in a temporary git repo.

prepare -> train_tokenizer -> extract_latents -> train_transformer -> sample -> evaluate -> report,
then a second `dvc repro` has nothing to do, and every stage has an MLflow run under one parent.
"""
from __future__ import annotations

import json
import sys

from tests.project_copy import copy_project, run


def test_smoke_pipeline_end_to_end(project_root, tmp_path):
    repo = copy_project(project_root, tmp_path / "repo")
    run([sys.executable, "-m", "flexvar.cli", "preset", "smoke"], repo)
    first = run([sys.executable, "-m", "dvc", "repro"], repo)
    for stage in ("prepare", "train_tokenizer", "extract_latents", "report"):
        assert f"Running stage '{stage}" in first.stdout, first.stdout[-2000:]
    table = json.loads((repo / "reports" / "fid_table.json").read_text())
    assert table, "empty FID table"
    assert (repo / "reports" / "fid_vs_steps.png").is_file()
    second = run([sys.executable, "-m", "dvc", "repro"], repo)
    assert "Running stage" not in second.stdout
    assert "up to date" in run([sys.executable, "-m", "dvc", "status"], repo).stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("flexvar")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("flexvar_role") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    stages = {r.data.tags.get("stage") for r in children}
    assert {"prepare", "train_tokenizer", "train_transformer", "sample", "evaluate", "report"} <= stages
