"""Ray Tune sweep on a real local Ray, a real Prefect server and a real (embedded) MLflow store.

1. A 4-trial sweep in which one trial's worker process is SIGKILLed after its first report: Tune
   restarts it (FailureConfig) and it resumes from its checkpoint; all 4 trials end without error;
   MLflow holds one sweep run with exactly 4 trial children; best_params.yaml holds the values of the trial
   with the lowest last metric (read from Ray Tune's own result files) and applies as a preset.
2. A sweep driver (`python -m flows.sweep`, 2 trials) interrupted with Ctrl-C mid-sweep is continued
   by `--resume` (Tuner.restore): all trials complete and an interrupted one resumes from its checkpoint.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.flows_support import ROOT, local_ray, stage_workdir

pytestmark = pytest.mark.slow   # real Ray Tune + Prefect + MLflow

SWEEP = {"num_samples": 4, "steps": 8, "grace_steps": 4, "report_every": 4, "cpus_per_trial": 1.0,
         "max_failures": 2, "search_space": {"schedule.canonical_prob": [0.0, 0.5], "schedule.max_drops": [0, 4]}}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    local_ray(2)
    return stage_workdir(tmp_path_factory.mktemp("sweep"), {"resources": {"train_workers": 1}, "sweep": SWEEP})


def kill_first_trial_after_report(work: Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL the worker of the first trial that has written a checkpoint (its first report)."""
    while not stop.is_set():
        for trial in sorted(work.glob("*")) if work.is_dir() else []:
            pids = trial / "pids"
            if (trial / "resume.pt").is_file() and pids.is_file():
                pid = int(pids.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(trial.name)
                return
        time.sleep(0.05)


def mlflow_runs(db: Path) -> dict[str, dict[str, str]]:
    with sqlite3.connect(db) as con:
        rows = con.execute("select run_uuid, key, value from tags").fetchall()
    runs: dict[str, dict[str, str]] = {}
    for run_id, key, value in rows:
        runs.setdefault(run_id, {})[key] = value
    return runs


def last_results(exp_dir: Path, metric: str) -> list[dict]:
    """Each trial's last reported result holding `metric`, from Ray Tune's own per-trial result.json files."""
    import json

    out = []
    for path in sorted(exp_dir.glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if metric in r]
        if rows:
            out.append(rows[-1])
    return out


def assert_best_params_are_the_best_trials(exp_dir: Path, best_file: Path, metric: str) -> None:
    """best_params.yaml holds, key by key, the config of the trial whose last `metric` is lowest (Ray's
    record of every trial; the file rounds floats to 6 decimals)."""
    results = last_results(exp_dir, metric)
    assert len(results) == len(list(exp_dir.glob("*/result.json"))) == SWEEP["num_samples"]
    lowest = min(r[metric] for r in results)
    winners = [r["config"] for r in results if r[metric] == lowest]
    written = yaml.safe_load(best_file.read_text())

    def value(key: str):
        node = written
        for part in key.split("."):
            node = node[part]
        return node

    def same(config: dict) -> bool:
        return all(value(k) == pytest.approx(v, abs=1e-6) and type(value(k)) is type(v) for k, v in config.items())
    assert set(winners[0]) == set(SWEEP["search_space"])
    assert any(same(c) for c in winners), (written, winners, sorted((r[metric], r["config"]) for r in results))
    assert not all(same(r["config"]) for r in results)                 # the trials differ: the choice is visible


def test_sweep_retries_killed_trial(sweep_dir):
    from flexvar.presets import apply_preset
    from flows.sweep import run_sweep

    killed: list[str] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_first_trial_after_report,
                              args=(sweep_dir / "ray_results" / "s1" / "work", killed, stop), daemon=True)
    killer.start()
    try:
        out = run_sweep(sweep_dir, "s1", latents="lat", tokenizer="tok")
    finally:
        stop.set()
    assert killed, "no trial was killed"
    assert len(out["trials"]) == 4 and all(t["error"] is None for t in out["trials"])
    restarts = (sweep_dir / "ray_results" / "s1" / "work" / killed[0] / "pids").read_text().split()
    assert len(restarts) == 2                                       # killed once, restarted once
    runs = mlflow_runs(sweep_dir / "mlflow.db")
    parents = [r for r, t in runs.items() if t.get("flexvar_role") == "sweep"]
    children = [t for t in runs.values() if t.get("mlflow.parentRunId") in parents]
    assert len(parents) == 1 and len(children) == 4                 # the restarted trial kept its run
    best = Path(out["best_file"])
    assert set(yaml.safe_load(best.read_text())["schedule"]) == {"canonical_prob", "max_drops"}
    assert_best_params_are_the_best_trials(sweep_dir / "ray_results" / "s1", best, metric="val_loss_panel")
    params = sweep_dir / "params_best.yaml"
    shutil.copy(sweep_dir / "params.yaml", params)
    apply_preset(str(best), params)                                 # valid as a `flexvar preset` file
    assert "-S 'schedule.canonical_prob=" in out["dvc_args"]


def test_sweep_restore_after_interrupt(sweep_dir):
    from flows.sweep import run_sweep

    work = sweep_dir / "ray_results" / "s2" / "work"
    params = yaml.safe_load((sweep_dir / "params.yaml").read_text())
    params["sweep"]["num_samples"] = 2                              # enough to interrupt and resume
    (sweep_dir / "params_s2.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "flows.sweep", "--root", str(sweep_dir), "--params", "params_s2.yaml",
           "--name", "s2", "--latents", "lat", "--tokenizer", "tok"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(cmd, cwd=sweep_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(work.glob("*/resume.pt")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
    driver.send_signal(signal.SIGINT)                               # Ctrl-C: Tune saves its state and stops
    log = driver.communicate(timeout=120)[0].decode()
    assert not (sweep_dir / "ray_results" / "s2" / "best_params.yaml").exists(), log[-3000:]
    out = run_sweep(sweep_dir, "s2", "params_s2.yaml", resume=True, latents="lat", tokenizer="tok")
    assert len(out["trials"]) == 2 and all(t["error"] is None for t in out["trials"])
    assert any(len((t / "pids").read_text().split()) == 2 for t in work.iterdir())   # resumed after the interrupt
