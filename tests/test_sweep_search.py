"""Ray Tune search on a real local Ray (+ Prefect, embedded MLflow): Optuna TPE with ASHA, every
configuration scored over two seeds, and a trial that resumes from its Tune checkpoint.

One sweep of 3 configurations x 2 seeds. The first trial to report a Tune checkpoint is SIGKILLed and
the folder its first start trained in is deleted (a node gone with its disk); Tune restarts it
(FailureConfig) and it must resume at the checkpointed step from `tune.get_checkpoint()`, not at 0.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.flows_support import local_ray, stage_workdir

pytestmark = pytest.mark.slow   # real Ray Tune + Prefect + MLflow

METRIC = "val_loss_panel"
SWEEP = {"num_samples": 3, "steps": 8, "grace_steps": 8, "report_every": 4, "cpus_per_trial": 1.0,
         "max_failures": 1, "seeds": [0, 1], "search_space": {"schedule.canonical_prob": [0.0, 1.0], "schedule.max_drops": [0, 4]},
         "eval_panel": {"canonical": {"scales": [1, 2, 3, 4, 5, 6, 8]}, "short": {"steps": 4}}}


def kill_after_first_checkpoint(exp_dir: Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL the worker of the first trial whose Tune checkpoint is registered (its report is in the trial's
    result.json, which Tune writes after registering the report's checkpoint); delete its start folder."""
    work = exp_dir / "work"
    while not stop.is_set():
        for ckpt in sorted(exp_dir.glob("*/checkpoint_000000")):
            result = ckpt.parent / "result.json"
            if not (result.is_file() and result.read_text().strip()):
                continue
            trial_id = next(t.name for t in work.iterdir() if t.name in ckpt.parent.name)
            pid = int((work / trial_id / "pids").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            shutil.rmtree(work / trial_id / f"start-{pid}")     # nothing of the first start survives
            killed.append((trial_id, ckpt.parent))
            return
        time.sleep(0.05)


def reports(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def test_tpe_asha_two_seeds_and_resume_from_tune_checkpoint(tmp_path_factory):
    from flows.sweep import run_sweep

    local_ray(2)
    root = stage_workdir(tmp_path_factory.mktemp("search"), {"resources": {"train_workers": 1}, "sweep": SWEEP})
    exp_dir = root / "ray_results" / "tpe"
    killed: list = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_after_first_checkpoint, args=(exp_dir, killed, stop), daemon=True)
    killer.start()
    try:
        out = run_sweep(root, "tpe", latents="lat", tokenizer="tok")
    finally:
        stop.set()

    # every configuration scored over both seeds: the score is their mean, its s.d. beside it
    assert len(out["trials"]) == 3 and all(t["error"] is None for t in out["trials"]), out["trials"]
    for t in out["trials"]:
        m = t["metrics"]
        seeds = [m[f"{METRIC}/seed0"], m[f"{METRIC}/seed1"]]
        assert seeds[0] != seeds[1]                                        # the seeds train different runs
        assert m[METRIC] == pytest.approx(statistics.fmean(seeds))
        assert m[f"{METRIC}_std"] == pytest.approx(statistics.stdev(seeds))
    best = (exp_dir / "best_params.yaml").read_text()
    assert f"{out['best_value']:.5f} +- {out['best_std']:.5f} (mean +- s.d. over 2 seeds: seed0 " in best
    assert set(yaml.safe_load(best)["schedule"]) == {"canonical_prob", "max_drops"}
    # the search algorithm is Optuna's (its study is in Tune's saved searcher state)
    (state,) = exp_dir.glob("searcher-state-*.pkl")
    assert b"optuna" in state.read_bytes() and b"TPESampler" in state.read_bytes()

    from mlflow import MlflowClient   # the sweep's runs carry MLflow's standard tags

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("flexvar").experiment_id])
    assert len(runs) == 4                                                  # the sweep and its 3 trials
    for r in runs:
        assert r.data.tags["mlflow.user"] and r.data.tags["mlflow.source.type"] == "LOCAL"
        assert r.data.tags["mlflow.runName"] == r.info.run_name

    # the killed trial restarted once and resumed at its checkpointed step, from the Tune checkpoint
    assert killed, "no trial was killed"
    trial_id, trial_dir = killed[0]
    assert len((exp_dir / "work" / trial_id / "pids").read_text().split()) == 2
    rows = reports(trial_dir)
    first_ckpt_step = SWEEP["report_every"]
    assert [r["step"] for r in rows if r["start_step"] == 0][0] == first_ckpt_step
    resumed = [r for r in rows if r["start_step"] != 0]
    assert resumed and all(r["start_step"] == first_ckpt_step for r in resumed), rows
    assert resumed[-1]["step"] == SWEEP["steps"]
