"""Does the sweep's winner transfer? Retrain the best and the default sampler settings at full length
and compare their FID over the sample schedules (`python -m flows.sweep --transfer`).

A sweep scores short trials by val loss; what matters is sample quality of a fully trained model.
For each of `default` (params.yaml as it is) and `best` (the sweep's winning settings applied), this
runs the pipeline's own stage commands — train_transformer (`train_transformer.steps`, or
`--transfer-steps`), then sample and evaluate for every schedule in `variants.schedules` — into
ray_results/<sweep>/transfer/<label>/, each stage an MLflow child run of the sweep's run (tagged
`sweep_setting=<label>`). The comparison — FID per schedule side by side, and FID against steps
with one line per setting — is written to transfer/comparison.{md,json,png} and logged on the
sweep's run (metrics `fid_<space>_<label>_<schedule>`, artifacts).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from flexvar.config import ConfigError, Params, load_params, load_params_dict

LABELS = ("default", "best")


def apply_settings(data: dict, settings: dict[str, Any]) -> dict:
    """Set whole settings given by dotted keys (no list indices) in a nested params mapping, in place."""
    for key, value in settings.items():
        d = data
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return data


def setting_params(base_yaml: dict, settings: dict[str, Any], depth: int, steps: int | None) -> dict:
    """params.yaml's mapping with whole `settings` (dotted, no list indices) applied, one depth, maybe fewer steps."""
    data = apply_settings(copy.deepcopy(base_yaml), settings)
    data.setdefault("variants", {})["depths"] = [depth]
    if steps is not None:
        data.setdefault("train_transformer", {})["steps"] = steps
    load_params_dict(data, origin="transfer params")   # bad settings fail here, naming the key
    return data


def stage_commands(params: Params, folder: Path, depth: int, latents: str, tokenizer: str, reference: str,
                   feature_net: str) -> list[list[str]]:
    """The stage commands (as dvc.yaml runs them) for one setting, writing under `folder`."""
    py, p = sys.executable, str(folder / "params.yaml")
    model = str(folder / "model")
    cmds = [[py, "-m", "pipeline.train_transformer", "--depth", str(depth), "--params", p, "--latents", latents,
             "--tokenizer", tokenizer, "--out", model, "--metrics", str(folder / "train.json"),
             "--plots", str(folder / "plots")]]
    for sched in params.variants.schedules:
        samples = folder / "samples" / sched
        cmds.append([py, "-m", "pipeline.sample", "--params", p, "--depth", str(depth), "--schedule", sched,
                     "--model", model, "--out", str(samples)])
        cmds.append([py, "-m", "pipeline.evaluate", "--params", p, "--depth", str(depth), "--schedule", sched,
                     "--samples", str(samples / "samples.npz"), "--reference", reference,
                     "--feature-net", feature_net, "--out", str(folder / "eval" / f"{sched}.json")])
    return cmds


def run_setting(root: Path, folder: Path, params: Params, cmds: list[list[str]], parent_run_id: str | None) -> None:
    """Run one setting's stages in order (skipping those whose output exists: a rerun continues)."""
    env = {**os.environ, "DVC_ROOT": str(root), "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if parent_run_id:
        env["FLEXVAR_PARENT_RUN_ID"] = parent_run_id
    for cmd in cmds:
        out = Path(cmd[cmd.index("--out") + 1])
        done = out / "flexvar.pt" if cmd[2] == "pipeline.train_transformer" else (
            out / "samples.npz" if cmd[2] == "pipeline.sample" else out)
        if done.exists():
            continue
        print(f"[transfer] {folder.name}: {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.run(cmd, cwd=root, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"transfer {folder.name}: `{' '.join(cmd[2:5])}` failed (exit {proc.returncode})")


def comparison_rows(params: Params, folders: dict[str, Path], depth: int) -> list[dict[str, Any]]:
    """One row per (setting, schedule): the evaluate metrics plus steps / size, as the report's rows."""
    from flexvar.schedules import schedule_size, schedule_steps

    res = params.data.resolution
    rows = []
    for label, folder in folders.items():
        for sched in params.variants.schedules:
            h, w = schedule_size(params, sched)
            rows.append({"setting": label, "depth": depth, "schedule": sched, "steps": schedule_steps(params, sched),
                         "size": f"{h}x{w}", "train_size": f"{res}x{res}",
                         **json.loads((folder / "eval" / f"{sched}.json").read_text())})
    return rows


def _with_interval(row: dict[str, Any], key: str) -> str:
    """`value [low, high]` when evaluate wrote a bootstrap interval for `key`, else the value."""
    lo, hi = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    return f"{row[key]:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "")


def comparison_table(rows: list[dict[str, Any]], space: str) -> str:
    """Markdown: FID per schedule (95% bootstrap interval where evaluated), default and best side by side,
    and the change."""
    key = f"fid_{space}"
    by = {(r["setting"], r["schedule"]): r for r in rows}
    scheds = list(dict.fromkeys(r["schedule"] for r in rows))
    lines = [f"| schedule | steps | size | {key} default | {key} best | best - default |", "|---|---:|---|---:|---:|---:|"]
    for s in scheds:
        d, b = by[("default", s)], by[("best", s)]
        lines.append(f"| {s} | {d['steps']} | {d['size']} | {_with_interval(d, key)} | {_with_interval(b, key)} "
                     f"| {b[key] - d[key]:+.3f} |")
    mean = {lab: sum(by[(lab, s)][key] for s in scheds) / len(scheds) for lab in LABELS}
    lines.append(f"| **mean** | | | {mean['default']:.3f} | {mean['best']:.3f} | {mean['best'] - mean['default']:+.3f} |")
    return "\n".join(lines) + "\n"


def transfer(root: Path, params_file: str, exp_dir: Path, best_settings: dict[str, Any], depth: int, *,
             latents: str, tokenizer: str, reference: str, feature_net: str, steps: int | None = None,
             parent_run_id: str | None = None) -> dict[str, Any]:
    """Train, sample and evaluate the default and the best setting; write and log the comparison."""
    from flexvar.evaluation.report import plot_fid_vs_steps

    base_yaml = yaml.safe_load((root / params_file).read_text()) or {}
    out_dir = exp_dir / "transfer"
    folders = {}
    for label, settings in (("default", {}), ("best", best_settings)):
        folder = out_dir / label
        folder.mkdir(parents=True, exist_ok=True)
        data = setting_params(base_yaml, settings, depth, steps)
        (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        params = load_params(folder / "params.yaml")
        run_setting(root, folder, params, stage_commands(params, folder, depth, latents, tokenizer, reference,
                                                         feature_net), parent_run_id)
        tag_runs(params, root, parent_run_id, label)
        folders[label] = folder
    params = load_params(folders["default"] / "params.yaml")
    space = params.evaluate.feature_space
    rows = comparison_rows(params, folders, depth)
    trained = params.train_transformer.steps
    table = comparison_table(rows, space)
    (out_dir / "comparison.md").write_text(
        f"# Sweep winner vs default: d{depth}, {trained} training steps, FID ({space} features)\n\n"
        f"best settings: `{json.dumps(best_settings)}`\n\n{table}")
    (out_dir / "comparison.json").write_text(json.dumps({"depth": depth, "train_steps": trained, "feature_space": space,
                                                         "best_settings": best_settings, "rows": rows}, indent=2))
    plot_fid_vs_steps(rows, space, out_dir / "comparison.png", line_of=lambda r: r["setting"],
                      title=f"d{depth}, {trained} steps: sweep best vs default")
    log_comparison(params, root, parent_run_id, rows, space, out_dir)
    return {"rows": rows, "table": table, "dir": str(out_dir)}


def _tracking(params: Params, root: Path):
    from pipeline.tracking import probe, resolve_uri

    return probe(resolve_uri(params, root)[0])


def tag_runs(params: Params, root: Path, parent_run_id: str | None, label: str) -> None:
    """Tag this setting's stage runs (children of the sweep run not yet tagged) `sweep_setting=<label>`."""
    if not parent_run_id:
        return
    client = _tracking(params, root)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                  f"and tags.stage != ''", max_results=1000):
        if "sweep_setting" not in run.data.tags:
            client.set_tag(run.info.run_id, "sweep_setting", label)


def log_comparison(params: Params, root: Path, parent_run_id: str | None, rows, space: str, out_dir: Path) -> None:
    """Per-setting FIDs as metrics and the comparison files as artifacts of the sweep's run."""
    if not parent_run_id:
        return
    from pipeline.tracking import MlflowLogger

    client = _tracking(params, root)
    log = MlflowLogger(client, parent_run_id, parent_run_id, "", "")
    log.log_metrics({f"fid_{space}_{r['setting']}_{r['schedule']}": r[f"fid_{space}"] for r in rows})
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        log.log_artifact(out_dir / name, "transfer")


__all__ = ["transfer", "setting_params", "comparison_table", "ConfigError"]
