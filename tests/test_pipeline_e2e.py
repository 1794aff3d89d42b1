"""The whole chain under a real `dvc repro` on the smoke preset, in a temporary git repo.

prepare -> train_tokenizer -> extract_latents -> train_transformer -> sample -> evaluate -> report,
then a second `dvc repro` has nothing to do, and every stage has an MLflow run under one parent.
"""
from __future__ import annotations

import json
import sys

import pytest

from tests.project_copy import copy_project, run

pytestmark = pytest.mark.slow   # real dvc repro of the whole chain


def test_smoke_pipeline_end_to_end(project_root, tmp_path):
    repo = copy_project(project_root, tmp_path / "repo")
    run([sys.executable, "-m", "flexvar.cli", "preset", "smoke"], repo)
    first = run([sys.executable, "-m", "dvc", "repro"], repo)
    for stage in ("prepare", "train_tokenizer", "extract_latents", "report"):
        assert f"Running stage '{stage}" in first.stdout, first.stdout[-2000:]
    import math

    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    table = json.loads((repo / "reports" / "fid_table.json").read_text())
    space = params["evaluate"]["feature_space"]
    assert table["feature_space"] == space
    assert sorted((r["depth"], r["schedule"]) for r in table["rows"]) == sorted(
        (d, s) for d in params["variants"]["depths"] for s in params["variants"]["schedules"])   # one row per variant
    for r in table["rows"]:
        assert math.isfinite(r[f"fid_{space}"]) and r[f"fid_{space}"] >= 0, r
        assert r == {**json.loads((repo / "metrics" / "eval" / f"d{r['depth']}" / f"{r['schedule']}.json").read_text()),
                     **{k: r[k] for k in ("depth", "schedule", "steps", "size", "train_size")}}
        assert r[f"fid_{space}_ci_low"] < r[f"fid_{space}"] < r[f"fid_{space}_ci_high"]   # 95% bootstrap interval
        if space == "domain":   # class accuracy of samples, with its interval
            assert r["class_acc_domain_ci_low"] <= r["class_acc_domain"] <= r["class_acc_domain_ci_high"]
    assert (repo / "reports" / "fid_vs_steps.png").is_file() and (repo / "reports" / "class_acc_vs_steps.png").is_file()
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
