"""DVC the way its users work, on a tiny config in a temporary git repo (real dvc):

- `dvc exp run -S train_transformer.lr=...` runs the chain and `dvc exp show --json` lists the experiment
  with its parameter and, per variant, FID and class accuracy;
- `dvc plots show --json` resolves every plot dvc.yaml declares to its declared x and y, with data in them;
- editing one sample schedule makes only that schedule's sample/evaluate stages stale.
"""
from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.project_copy import copy_project, run

pytestmark = pytest.mark.slow   # real dvc exp run of the whole chain

GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def _encodings(node, found: dict[str, set[str]]) -> dict[str, set[str]]:
    """Every encoding channel x/y field named anywhere in a vega-lite spec (layers included)."""
    if isinstance(node, dict):
        enc = node.get("encoding")
        if isinstance(enc, dict):
            for ch in ("x", "y"):
                if isinstance(enc.get(ch), dict) and "field" in enc[ch]:
                    found.setdefault(ch, set()).add(enc[ch]["field"])
        for v in node.values():
            _encodings(v, found)
    elif isinstance(node, list):
        for v in node:
            _encodings(v, found)
    return found


def declared_plots(repo) -> dict[str, dict]:
    """Data plots (not images) declared in dvc.yaml, with their resolved properties (matrix expanded)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return {str(o.fs_path).removeprefix(str(repo) + "/"): dict(o.plot) if isinstance(o.plot, dict) else {}
                for st in r.index.stages for o in st.outs if o.plot and not str(o).endswith(".png")}


def test_exp_run_set_param_then_exp_show_and_plots(project_root, tmp_path):
    repo = copy_project(project_root, tmp_path / "repo")
    dvc = [sys.executable, "-m", "dvc"]
    run([sys.executable, "-m", "flexvar.cli", "preset", "smoke"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(num_train=256, num_val=64)
    params["evaluate"]["bootstrap_samples"] = 50
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(GIT + ["commit", "-qam", "tiny config"], repo)

    out = run(dvc + ["exp", "run", "-S", "train_transformer.lr=0.001", "-n", "lr1e3"], repo)
    assert "Running stage 'train_transformer@2'" in out.stdout

    shown = json.loads(run(dvc + ["exp", "show", "--json"], repo).stdout)
    exps = [r for base in shown for e in (base.get("experiments") or []) for r in e["revs"] if r["name"] == "lr1e3"]
    assert len(exps) == 1, shown
    data = exps[0]["data"]
    assert data["params"]["params.yaml"]["data"]["train_transformer"]["lr"] == 0.001
    for sched in params["variants"]["schedules"]:
        m = data["metrics"][f"metrics/eval/d2/{sched}.json"]["data"]
        assert m["fid_domain"] >= 0 and 0 <= m["class_acc_domain"] <= 1, m

    plots = json.loads(run(dvc + ["plots", "show", "--json"], repo).stdout)["data"]
    declared = declared_plots(repo)
    assert {"plots/train/d2/train.csv", "plots/train/d2/val.csv", "plots/tokenizer/val_psnr.csv",
            "reports/fid_vs_steps.csv", "plots/feature_net.csv"} <= set(declared)
    for path, props in declared.items():
        assert "x" in props and "y" in props, f"{path}: dvc.yaml names no x/y: {props}"
        (shown_plot,) = [p for p in plots[path] if p["type"] == "vega"]
        enc = _encodings(shown_plot["content"], {})
        assert enc.get("x") == {props["x"]} and props["y"] in enc.get("y", set()), (path, enc, props)
        rows = shown_plot["content"]["data"]["values"]
        filled = [r for r in rows if r.get(props["x"]) not in (None, "") and r.get(props["y"]) not in (None, "")]
        assert filled, f"{path}: no row has both {props['x']} and {props['y']}"
        if props.get("title"):
            assert props["title"] in json.dumps(shown_plot["content"]["title"])

    # one schedule edited: only its sample and evaluate stages are stale, not the other schedule's
    params = yaml.safe_load((repo / "params.yaml").read_text())   # as the experiment left it (lr set)
    params["sample"]["schedules"]["canonical"] = {"steps": 6}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = set(json.loads(run(dvc + ["status", "--json"], repo).stdout))
    assert {"sample@2-canonical", "evaluate@2-canonical"} <= stale
    assert not stale & {"sample@2-short", "evaluate@2-short", "train_transformer@2"}, stale
